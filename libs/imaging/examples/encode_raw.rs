//! Runs the OpenEXR or AVIF encoder on raw samples, for the interop tests (tests/interop) and
//! for trying the encoders by hand.
//!
//! ```text
//! cargo run -p luna-imaging --example encode_raw -- exr  IN W H CHANNELS 16|32  META OUT
//! cargo run -p luna-imaging --example encode_raw -- avif IN W H CHANNELS QUALITY META OUT
//! ```
//! `IN` holds row-major interleaved samples: little-endian `f32` for `exr`, bytes for `avif`.
//! `META` is a JSON array of `[key, value]` string pairs: EXR header attributes, or for AVIF
//! the entries of ComfyUI's EXIF scheme (`prompt` in 0x0110, the others from 0x010F down);
//! `-` for none.

use std::error::Error;

use luna_imaging::metadata::{Entry, EntryValue, Metadata};
use luna_imaging::{avif, exif, exr};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        format,
        input,
        width,
        height,
        channels,
        setting,
        meta,
        output,
    ] = args.as_slice()
    else {
        return Err("usage: encode_raw exr|avif IN W H CHANNELS 16|32|QUALITY META OUT".into());
    };
    let raw = std::fs::read(input)?;
    let (width, height, channels): (u32, u32, u8) =
        (width.parse()?, height.parse()?, channels.parse()?);
    let meta: Vec<(String, String)> = if meta == "-" {
        Vec::new()
    } else {
        serde_json::from_slice(&std::fs::read(meta)?)?
    };
    let bytes = match format.as_str() {
        "exr" => {
            let precision = exr::Precision::from_bits(setting.parse()?)
                .ok_or("exr precision must be 16 or 32")?;
            if raw.len() % 4 != 0 {
                return Err("exr input is not a whole number of f32 samples".into());
            }
            let samples: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            exr::encode(&samples, width, height, channels, precision, &meta)?
        }
        "avif" => {
            let entries = Metadata {
                entries: meta
                    .into_iter()
                    .map(|(key, value)| Entry {
                        key,
                        value: EntryValue::Text(value),
                    })
                    .collect(),
            };
            let tiff = (!entries.is_empty()).then(|| exif::build(&entries.exif_entries()));
            avif::encode(
                &raw,
                width,
                height,
                channels,
                setting.parse()?,
                tiff.as_deref(),
            )?
        }
        other => return Err(format!("unknown format {other:?}: exr or avif").into()),
    };
    std::fs::write(output, bytes)?;
    Ok(())
}
