//! `save_path` and `filename` templates.
//!
//! Tokens: `%model_name%`, `%model_path%`, `%model_dir%`, `%index%`, `%source%` (the stem of the
//! file the image came from, as `luna submit` fills it; empty when absent) and `%time:FMT%`. A token's
//! closing `%` may double as the opening `%` of the next token, so `%time:YYYY-mm-dd_%index%`
//! renders as `2025-12-09_0`. Unknown tokens stay literal. After rendering, characters that are
//! unsafe in file names on common systems (`<>:"|?*`, `\` and control characters) become `_`.
//!
//! Rendering is pure: the time is the job's submission time carried in the task, so every
//! retry of a task renders the same name.

use chrono::{DateTime, Datelike, FixedOffset, Timelike};

/// Model-file extensions that the model tokens leave out.
pub const MODEL_EXTENSIONS: [&str; 6] = [".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf"];

/// `%model_name%` when no model is given.
pub const UNKNOWN_MODEL: &str = "UnknownModel";

/// What the tokens of one job render to.
#[derive(Debug, Clone)]
pub struct TemplateContext<'a> {
    /// The request's `model_name`: a file name or path, `/` or `\` separated.
    pub model_name: &'a str,
    /// The request's `index`.
    pub index: i64,
    /// The image's `source`: the stem of the file it came from, or empty.
    pub source: &'a str,
    /// The job's submission time, in the gateway's UTC offset.
    pub time: DateTime<FixedOffset>,
}

/// A rendered path that would leave the output root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("renders to the absolute path {0:?}; paths are relative to the output root")]
    Absolute(String),
    #[error("renders to {0:?}, which has a `..` component; paths may not leave the output root")]
    ParentDir(String),
}

/// Renders `template`, then makes the result safe for file names (`/` is kept as separator).
pub fn render(template: &str, ctx: &TemplateContext<'_>) -> String {
    sanitize(&expand(template, ctx))
}

/// Renders `template` and splits it into path components, rejecting anything that could escape
/// the output root. Empty and `.` components are dropped, so `a//b/./c` is `a/b/c`.
///
/// # Errors
/// [`PathError`] when the rendered path is absolute or has a `..` component.
pub fn render_relative(
    template: &str,
    ctx: &TemplateContext<'_>,
) -> Result<Vec<String>, PathError> {
    relative_components(&render(template, ctx))
}

/// Splits a rendered path into components, as [`render_relative`] does.
///
/// # Errors
/// [`PathError`] when `rendered` is absolute or has a `..` component.
pub fn relative_components(rendered: &str) -> Result<Vec<String>, PathError> {
    if rendered.starts_with('/') {
        return Err(PathError::Absolute(rendered.to_owned()));
    }
    let mut parts = Vec::new();
    for part in rendered.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathError::ParentDir(rendered.to_owned())),
            other => parts.push(other.to_owned()),
        }
    }
    Ok(parts)
}

/// Replaces characters that are unsafe in file names with `_`; keeps `/`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' | '>' | ':' | '"' | '|' | '?' | '*' | '\\' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect()
}

fn expand(template: &str, ctx: &TemplateContext<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        match token_at(rest, ctx) {
            Some((value, close)) => {
                out.push_str(&value);
                // The closing `%` is consumed, unless it opens another token.
                rest = if token_at(&rest[close..], ctx).is_some() {
                    &rest[close..]
                } else {
                    &rest[close + 1..]
                };
            }
            None => {
                out.push('%');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `s` (which starts with `%`) opens a known token, its value and the index of its closing `%`.
fn token_at(s: &str, ctx: &TemplateContext<'_>) -> Option<(String, usize)> {
    let close = 1 + s[1..].find('%')?;
    let name = &s[1..close];
    let value = match name {
        "model_name" => model_name(ctx.model_name),
        "model_path" => model_path(ctx.model_name),
        "model_dir" => model_dir(ctx.model_name),
        "index" => ctx.index.to_string(),
        "source" => source_name(ctx.source),
        _ => format_time(name.strip_prefix("time:")?, &ctx.time),
    };
    Some((value, close))
}

/// The model path with `/` separators, no leading separator and no model extension: model
/// tokens name things, they never point outside the output root.
fn normalized_model(model: &str) -> String {
    let path = model.replace('\\', "/");
    let path = path.trim_start_matches('/');
    let lower = path.to_ascii_lowercase();
    let cut = MODEL_EXTENSIONS
        .iter()
        .find(|ext| lower.ends_with(*ext))
        .map_or(path.len(), |ext| path.len() - ext.len());
    path[..cut].to_owned()
}

/// `%source%`: one file-name component. Separators become `_` (a source never adds folders)
/// and a name of dots only (`.`, `..`) becomes as many `_`, so it never leaves its folder;
/// the rest is sanitised with the whole rendered path.
pub fn source_name(source: &str) -> String {
    let name = source.replace(['/', '\\'], "_");
    if !name.is_empty() && name.bytes().all(|b| b == b'.') {
        return "_".repeat(name.len());
    }
    name
}

/// `%model_name%`: the file name without directory and extension.
pub fn model_name(model: &str) -> String {
    let path = normalized_model(model);
    let name = path.rsplit('/').next().unwrap_or_default();
    if name.is_empty() {
        UNKNOWN_MODEL.to_owned()
    } else {
        name.to_owned()
    }
}

/// `%model_path%`: the path as given, without the extension.
pub fn model_path(model: &str) -> String {
    let path = normalized_model(model);
    if path.is_empty() {
        UNKNOWN_MODEL.to_owned()
    } else {
        path
    }
}

/// `%model_dir%`: the directory part; `.` when the model has none, so `%model_dir%/x` stays
/// relative.
pub fn model_dir(model: &str) -> String {
    let path = normalized_model(model);
    match path.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => dir.to_owned(),
        _ => ".".to_owned(),
    }
}

/// `YYYY mm dd HH MM SS` become year, month, day, hour, minute, second; all else is literal.
pub fn format_time(fmt: &str, t: &DateTime<FixedOffset>) -> String {
    let mut out = String::with_capacity(fmt.len() + 8);
    let mut rest = fmt;
    while !rest.is_empty() {
        let (value, len) = if rest.starts_with("YYYY") {
            (format!("{:04}", t.year()), 4)
        } else if rest.starts_with("mm") {
            (format!("{:02}", t.month()), 2)
        } else if rest.starts_with("dd") {
            (format!("{:02}", t.day()), 2)
        } else if rest.starts_with("HH") {
            (format!("{:02}", t.hour()), 2)
        } else if rest.starts_with("MM") {
            (format!("{:02}", t.minute()), 2)
        } else if rest.starts_with("SS") {
            (format!("{:02}", t.second()), 2)
        } else {
            let c = rest.chars().next().unwrap_or_default();
            (c.to_string(), c.len_utf8())
        };
        out.push_str(&value);
        rest = &rest[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(model: &str) -> TemplateContext<'_> {
        TemplateContext {
            model_name: model,
            index: 0,
            source: "",
            time: DateTime::parse_from_rfc3339("2025-12-09T14:03:07+09:00").expect("time"),
        }
    }

    #[test]
    fn shared_percent_between_time_and_index() {
        assert_eq!(render("%time:YYYY-mm-dd_%index%", &ctx("")), "2025-12-09_0");
        assert_eq!(render("%time:YYYY%%index%", &ctx("")), "20250");
        assert_eq!(render("%index%%index%", &ctx("")), "00");
    }

    #[test]
    fn time_uses_the_carried_offset_and_all_fields() {
        assert_eq!(
            render("%time:YYYY_mm_dd.HH.MM.SS%", &ctx("")),
            "2025_12_09.14.03.07"
        );
        assert_eq!(
            render("%time:HHh%", &ctx("")),
            "14h",
            "other letters are literal"
        );
    }

    #[test]
    fn default_filename_template() {
        let c = ctx("C:\\models\\SDXL\\juggernaut_v9.safetensors");
        assert_eq!(
            render(luna_job::request::DEFAULT_FILENAME, &c),
            "2025_12_09.14.03.07_juggernaut_v9"
        );
    }

    #[test]
    fn model_tokens() {
        let c = ctx("checkpoints/sdxl/dreamshaper.SafeTensors");
        assert_eq!(
            render("%model_name%|%model_path%|%model_dir%", &c),
            "dreamshaper_checkpoints/sdxl/dreamshaper_checkpoints/sdxl"
        );
        for ext in MODEL_EXTENSIONS {
            assert_eq!(model_name(&format!("m{ext}")), "m");
        }
        assert_eq!(
            model_name("flux.1-dev.fp8"),
            "flux.1-dev.fp8",
            "other extensions stay"
        );
        assert_eq!(model_name(""), UNKNOWN_MODEL);
        assert_eq!(model_path(""), UNKNOWN_MODEL);
        assert_eq!(model_dir("plain.ckpt"), ".");
        assert_eq!(
            model_path("/abs/m.pt"),
            "abs/m",
            "model tokens never make a path absolute"
        );
    }

    #[test]
    fn unknown_tokens_stay_literal() {
        assert_eq!(render("%foo%_%index%", &ctx("")), "%foo%_0");
        assert_eq!(render("100%", &ctx("")), "100%");
        assert_eq!(render("%time%", &ctx("")), "%time%");
    }

    #[test]
    fn unsafe_characters_become_underscores() {
        assert_eq!(
            render("a<b>c:d\"e|f?g*h\\i\tj/k", &ctx("")),
            "a_b_c_d_e_f_g_h_i_j/k"
        );
    }

    #[test]
    fn paths_may_not_escape_the_root() {
        let c = ctx("../../etc/passwd.ckpt");
        assert!(matches!(
            render_relative("/etc", &c),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            render_relative("a/../../b", &c),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            render_relative("%model_dir%", &c),
            Err(PathError::ParentDir(_))
        ));
        assert_eq!(
            render_relative("a//./b/", &c).expect("relative"),
            ["a", "b"]
        );
        assert_eq!(
            render_relative("C:\\Windows", &c).expect("relative"),
            ["C__Windows"]
        );
        assert_eq!(
            render_relative("..a/b..", &c).expect("not a parent"),
            ["..a", "b.."]
        );
    }

    #[test]
    fn source_is_one_sanitised_component_or_empty() {
        let with = |source| TemplateContext { source, ..ctx("") };
        assert_eq!(render("%source%", &with("photo")), "photo");
        assert_eq!(render("out_%source%_%index%", &with("")), "out__0");
        assert_eq!(render("%source%", &with("a/b\\c:d")), "a_b_c_d");
        assert_eq!(render("%source%", &with("..")), "__");
        assert_eq!(
            render_relative("x/%source%", &with("../..")).expect("stays inside"),
            ["x", ".._.."]
        );
    }
}
