//! What is embedded in a saved image, and how each format spells it.
//!
//! The keys follow ComfyUI, so ComfyUI can load the workflow back from any file we write:
//! `prompt` (the API prompt), one key per `extra_pnginfo` entry (normally `workflow`), then
//! `parameters` (A1111-style text for tools such as Civitai and A1111 itself), the custom keys,
//! and `luna_job_id`. With `embed_workflow` off nothing is embedded at all.
//!
//! JSON values are written with non-ASCII characters escaped (`\u00e9`), as Python's
//! `json.dumps` does for ComfyUI: the text is then plain ASCII, valid as a PNG `tEXt` chunk and
//! as an EXIF ASCII tag, and still parses to exactly the same value.

use luna_job::SaveTask;
use serde_json::{Map, Value};

/// One embedded key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: EntryValue,
}

/// An embedded value: JSON, or plain text written as is.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryValue {
    Json(Value),
    Text(String),
}

impl EntryValue {
    /// The value as embedded text.
    pub fn to_text(&self) -> String {
        match self {
            Self::Json(v) => ascii_json(v),
            Self::Text(s) => s.clone(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Json(v) => v.clone(),
            Self::Text(s) => Value::String(s.clone()),
        }
    }
}

/// The ordered metadata of one image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    pub entries: Vec<Entry>,
}

/// A PNG text chunk's keyword and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextChunk {
    pub keyword: String,
    pub text: String,
}

/// EXIF tag of the ComfyUI `prompt` entry (IFD0 Model).
pub const EXIF_PROMPT_TAG: u16 = 0x0110;
/// EXIF tag of the first other entry (IFD0 Make); the rest count down from here.
pub const EXIF_FIRST_TAG: u16 = 0x010F;

impl Metadata {
    /// Metadata for `task`: nothing when `embed_workflow` is off.
    pub fn from_task(task: &SaveTask) -> Self {
        let o = &task.options;
        if !o.embed_workflow {
            return Self::default();
        }
        let mut entries = Vec::new();
        let mut push = |key: &str, value: EntryValue| {
            entries.push(Entry {
                key: key.to_owned(),
                value,
            })
        };
        if let Some(prompt @ Value::Object(_)) = &o.prompt {
            push("prompt", EntryValue::Json(prompt.clone()));
        }
        if let Some(Value::Object(extra)) = &o.extra_pnginfo {
            for (key, value) in extra {
                push(key, EntryValue::Json(value.clone()));
            }
        }
        if let Some(Value::Object(meta)) = &o.metadata {
            push(
                "parameters",
                EntryValue::Text(a1111_parameters(
                    meta,
                    &o.model_name,
                    task.image.width,
                    task.image.height,
                )),
            );
        }
        if let Ok(Some(custom)) = o.custom_metadata_object() {
            for (key, value) in custom {
                match value {
                    Value::String(s) => push(&key, EntryValue::Text(s)),
                    other => push(&key, EntryValue::Json(other)),
                }
            }
        }
        push("luna_job_id", EntryValue::Text(task.job_id.to_string()));
        Self { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// PNG text chunks, in order.
    pub fn png_text_chunks(&self) -> Vec<TextChunk> {
        self.entries
            .iter()
            .map(|e| TextChunk {
                keyword: e.key.clone(),
                text: e.value.to_text(),
            })
            .collect()
    }

    /// EXIF IFD0 ASCII entries in ComfyUI's scheme: `prompt:<json>` in 0x0110, every other
    /// entry as `key:value` counting down from 0x010F.
    pub fn exif_entries(&self) -> Vec<(u16, String)> {
        let mut next = EXIF_FIRST_TAG;
        self.entries
            .iter()
            .map(|e| {
                let tag = if e.key == "prompt" {
                    EXIF_PROMPT_TAG
                } else {
                    let t = next;
                    next = next.saturating_sub(1).max(1);
                    t
                };
                (tag, format!("{}:{}", e.key, e.value.to_text()))
            })
            .collect()
    }

    /// The EXIF (TIFF data) for JPEG, WebP and AVIF: [`Metadata::exif_entries`] in IFD0, and
    /// A1111 `parameters`, when present, also as `UserComment` in the Exif sub-IFD, where
    /// A1111, Civitai and Image-Saver read it.
    pub fn exif(&self) -> Vec<u8> {
        let comment = self
            .entries
            .iter()
            .find(|e| e.key == "parameters")
            .map(|e| crate::exif::user_comment(&e.value.to_text()));
        crate::exif::build_with_user_comment(&self.exif_entries(), comment.as_deref())
    }

    /// All entries as one JSON object (the `<file>.json` sidecar): JSON values stay JSON.
    ///
    /// # Errors
    /// Only if serialisation fails, which string-keyed maps do not.
    pub fn to_json_object(&self) -> Result<Vec<u8>, serde_json::Error> {
        let map: Map<String, Value> = self
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.value.to_json()))
            .collect();
        serde_json::to_vec_pretty(&Value::Object(map))
    }
}

/// JSON text with every non-ASCII character escaped, as Python's `json.dumps` writes it.
pub fn ascii_json(v: &Value) -> String {
    let s = v.to_string();
    if s.is_ascii() {
        return s;
    }
    // Non-ASCII characters can only occur inside JSON strings, where `\uXXXX` means the same.
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// The A1111 `parameters` text: the positive prompt, `Negative prompt: ...`, then one line of
/// `Key: value` pairs (`Steps`, `Sampler`, `Schedule type`, `CFG scale`, `Seed`, `Size`,
/// `Model`, then any other fields). Values with commas are quoted, as A1111 does.
pub fn a1111_parameters(
    meta: &Map<String, Value>,
    model_name: &str,
    width: u32,
    height: u32,
) -> String {
    let text = |keys: &[&str]| keys.iter().find_map(|k| meta.get(*k)).map(plain);
    let mut out = String::new();
    if let Some(positive) = text(&["positive", "positive_prompt", "prompt"]) {
        out.push_str(&positive);
        out.push('\n');
    }
    if let Some(negative) = text(&["negative", "negative_prompt"]) {
        out.push_str("Negative prompt: ");
        out.push_str(&negative);
        out.push('\n');
    }
    let known: [(&str, &[&str]); 5] = [
        ("Steps", &["steps"]),
        ("Sampler", &["sampler_name", "sampler"]),
        ("Schedule type", &["scheduler"]),
        ("CFG scale", &["cfg", "cfg_scale"]),
        ("Seed", &["seed"]),
    ];
    let mut fields: Vec<(String, String)> = Vec::new();
    for (label, keys) in known {
        if let Some(v) = text(keys) {
            fields.push((label.to_owned(), v));
        }
    }
    fields.push(("Size".to_owned(), format!("{width}x{height}")));
    let model = text(&["model", "model_name", "checkpoint"])
        .map(|m| crate::template::model_name(&m))
        .or_else(|| (!model_name.is_empty()).then(|| crate::template::model_name(model_name)));
    if let Some(model) = model {
        fields.push(("Model".to_owned(), model));
    }
    let used: &[&str] = &[
        "positive",
        "positive_prompt",
        "prompt",
        "negative",
        "negative_prompt",
        "steps",
        "sampler_name",
        "sampler",
        "scheduler",
        "cfg",
        "cfg_scale",
        "seed",
        "model",
        "model_name",
        "checkpoint",
        "width",
        "height",
    ];
    for (key, value) in meta {
        if !used.contains(&key.as_str()) && !value.is_null() {
            fields.push((key.clone(), plain(value)));
        }
    }
    let line: Vec<String> = fields
        .into_iter()
        .map(|(k, v)| {
            let v = if v.contains(',') || v.contains('\n') {
                Value::String(v).to_string()
            } else {
                v
            };
            format!("{k}: {v}")
        })
        .collect();
    out.push_str(&line.join(", "));
    out
}

/// A value as A1111 shows it: strings bare, everything else as JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ascii_json_escapes_like_python_and_parses_back() {
        let v = json!({"text": "café ☕ 𝄞", "n": 1});
        let s = ascii_json(&v);
        assert!(s.is_ascii());
        assert!(
            s.contains("caf\\u00e9") && s.contains("\\ud834\\udd1e"),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<Value>(&s).expect("parses"), v);
    }

    #[test]
    fn parameters_follow_a1111() {
        let meta = json!({
            "positive": "a lighthouse at dusk", "negative": "blurry", "steps": 30, "sampler_name": "euler",
            "scheduler": "karras", "cfg": 7.5, "seed": 42, "model": "models/sdxl.safetensors", "denoise": 0.6,
            "loras": "a, b"
        });
        let text = a1111_parameters(meta.as_object().expect("object"), "", 1024, 768);
        assert_eq!(
            text,
            "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 30, Sampler: euler, Schedule type: karras, \
             CFG scale: 7.5, Seed: 42, Size: 1024x768, Model: sdxl, denoise: 0.6, loras: \"a, b\""
        );
        let text = a1111_parameters(&Map::new(), "ckpt/flux.gguf", 8, 8);
        assert_eq!(text, "Size: 8x8, Model: flux");
    }
}
