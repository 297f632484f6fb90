//! The contract's path rules:
//! `<root>/<save_path>/<affix if subdir and affix != "">/<stem>[_<affix>][_<batch_index>].<ext>`,
//! with rejected images in `_discarded/` beside where they would have landed.
//!
//! `filename` may contain `/`, like ComfyUI's `filename_prefix`: the parts before the last `/`
//! become folders under the affix folder.

use luna_imaging::template::{self, PathError, TemplateContext};
use luna_job::{Problem, SaveTask};

/// Folder for rejected images, beside where they would have landed.
pub const DISCARDED_DIR: &str = "_discarded";

/// Longest stem accepted, in bytes: file systems allow 255 per name, and the collision suffix
/// and extension need room.
pub const MAX_STEM_LEN: usize = 200;

/// Longest folder name accepted, in bytes (`NAME_MAX` of Linux file systems).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Longest relative path accepted, in bytes (`PATH_MAX`), counted with the longest collision
/// suffix and the `_discarded/` folder, so every name a task may end up with fits.
pub const MAX_PATH_LEN: usize = 4096;

/// Room kept in [`MAX_PATH_LEN`] for `/_discarded` and a `_99999` suffix.
const PATH_RESERVE: usize = 1 + DISCARDED_DIR.len() + 6;

/// Where one image goes, relative to the output root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Folders below the output root.
    pub dirs: Vec<String>,
    /// File name without collision suffix or extension.
    pub stem: String,
    /// Extension without the dot.
    pub ext: &'static str,
}

/// A task whose templates render to an unusable path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("save_path {0}")]
    SavePath(PathError),
    #[error("filename {0}")]
    Filename(PathError),
    #[error("filename renders to an empty name")]
    EmptyName,
    #[error("affix {0:?} cannot be a folder name")]
    Affix(String),
    #[error("the file name {0:?} is longer than {MAX_STEM_LEN} bytes")]
    TooLong(String),
    #[error("the folder name {0:?} is longer than {MAX_COMPONENT_LEN} bytes")]
    ComponentTooLong(String),
    #[error("the path {0:?} is longer than {MAX_PATH_LEN} bytes")]
    PathTooLong(String),
}

impl PlacementError {
    /// The request field at fault, for a validation [`Problem`].
    pub fn to_problem(&self, image_field: &str) -> Problem {
        let (field, message) = match self {
            Self::SavePath(e) => ("save_path".to_owned(), e.to_string()),
            Self::Filename(e) => ("filename".to_owned(), e.to_string()),
            Self::EmptyName => ("filename".to_owned(), "renders to an empty name".to_owned()),
            Self::Affix(a) => (
                format!("{image_field}.affix"),
                format!("{a:?} cannot be a folder name"),
            ),
            Self::TooLong(name) => (
                "filename".to_owned(),
                format!("renders to {name:?}, longer than {MAX_STEM_LEN} bytes"),
            ),
            Self::ComponentTooLong(name) => (
                "save_path".to_owned(),
                format!(
                    "renders a folder name of {} bytes ({}...); at most {MAX_COMPONENT_LEN} fit a file system",
                    name.len(),
                    truncated(name)
                ),
            ),
            Self::PathTooLong(path) => (
                "save_path".to_owned(),
                format!(
                    "renders a path of {} bytes ({}...); at most {MAX_PATH_LEN} are accepted",
                    path.len(),
                    truncated(path)
                ),
            ),
        };
        Problem::new(field, message)
    }
}

/// The first 40 characters of `s`, for messages about over-long names.
fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

impl Placement {
    /// Renders the task's templates into a placement.
    ///
    /// # Errors
    /// [`PlacementError`] when a template renders to an absolute path, a `..` component, an
    /// empty or over-long name, or the affix is not a usable folder name.
    pub fn for_task(task: &SaveTask) -> Result<Self, PlacementError> {
        Self::for_task_at(task, task.submitted_at)
    }

    /// [`Placement::for_task`] with `%time:...%` rendered from `time` instead of the task's
    /// `submitted_at` (the job's first submission time, for idempotent resubmissions).
    ///
    /// # Errors
    /// As [`Placement::for_task`].
    pub fn for_task_at(
        task: &SaveTask,
        time: chrono::DateTime<chrono::FixedOffset>,
    ) -> Result<Self, PlacementError> {
        let o = &task.options;
        let ctx = TemplateContext {
            model_name: &o.model_name,
            index: o.index,
            source: &task.image.source,
            time,
        };
        let mut dirs =
            template::render_relative(&o.save_path, &ctx).map_err(PlacementError::SavePath)?;
        let affix = template::sanitize(&task.image.affix).replace('/', "_");
        if task.image.subdir && !affix.is_empty() {
            if affix == "." || affix == ".." {
                return Err(PlacementError::Affix(affix));
            }
            dirs.push(affix.clone());
        }
        let mut name_parts =
            template::render_relative(&o.filename, &ctx).map_err(PlacementError::Filename)?;
        let mut stem = name_parts.pop().ok_or(PlacementError::EmptyName)?;
        dirs.extend(name_parts);
        if !affix.is_empty() {
            stem.push('_');
            stem.push_str(&affix);
        }
        if let Some(i) = task.image.batch_suffix() {
            stem.push_str(&format!("_{i}"));
        }
        if stem.len() > MAX_STEM_LEN {
            return Err(PlacementError::TooLong(stem));
        }
        if let Some(long) = dirs.iter().find(|d| d.len() > MAX_COMPONENT_LEN) {
            return Err(PlacementError::ComponentTooLong(long.clone()));
        }
        let placement = Self {
            dirs,
            stem,
            ext: task.image.format.extension(),
        };
        let path = placement.relative_path(0);
        if path.len() + PATH_RESERVE > MAX_PATH_LEN {
            return Err(PlacementError::PathTooLong(path));
        }
        Ok(placement)
    }

    /// The same name in the `_discarded/` folder beside this one.
    pub fn discarded(&self) -> Self {
        let mut dirs = self.dirs.clone();
        dirs.push(DISCARDED_DIR.to_owned());
        Self {
            dirs,
            ..self.clone()
        }
    }

    /// The file name with collision number `n` (0 = none, then `_1`, `_2`, ...).
    pub fn file_name(&self, n: u32) -> String {
        if n == 0 {
            format!("{}.{}", self.stem, self.ext)
        } else {
            format!("{}_{n}.{}", self.stem, self.ext)
        }
    }

    /// `dirs/file_name(n)`, `/`-separated.
    pub fn relative_path(&self, n: u32) -> String {
        let mut path = self.dirs.join("/");
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(&self.file_name(n));
        path
    }
}
