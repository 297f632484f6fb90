//! A minimal EXIF (TIFF) writer: one IFD0 of ASCII entries, little-endian.
//!
//! That is all ComfyUI's scheme needs, and writing it directly avoids pulling in a general EXIF
//! library. The output has no `Exif\0\0` prefix: WebP's `EXIF` chunk takes the TIFF data as is,
//! and JPEG's APP1 prefix is added by the JPEG encoder.

/// TIFF type code for ASCII (NUL-terminated bytes).
const ASCII: u16 = 2;

/// Builds a TIFF structure holding `entries` as ASCII tags of IFD0.
///
/// Entries are sorted by tag, as TIFF requires; with duplicate tags the first one wins. Text is
/// written as UTF-8 (JSON from [`crate::metadata`] is pure ASCII already).
pub fn build(entries: &[(u16, String)]) -> Vec<u8> {
    let mut sorted: Vec<&(u16, String)> = entries.iter().collect();
    sorted.sort_by_key(|(tag, _)| *tag);
    sorted.dedup_by_key(|(tag, _)| *tag);
    let count = sorted.len();
    // Header (8) + entry count (2) + entries (12 each) + next-IFD offset (4), then the values.
    let mut data_offset = 8 + 2 + 12 * count + 4;
    let mut out =
        Vec::with_capacity(data_offset + entries.iter().map(|(_, s)| s.len() + 2).sum::<usize>());
    out.extend_from_slice(b"II*\0");
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&u16::try_from(count).unwrap_or(u16::MAX).to_le_bytes());
    let mut values = Vec::new();
    for (tag, text) in &sorted {
        let len = text.len() + 1; // with the NUL
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&ASCII.to_le_bytes());
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        if len <= 4 {
            let mut inline = [0u8; 4];
            inline[..text.len()].copy_from_slice(text.as_bytes());
            out.extend_from_slice(&inline);
        } else {
            out.extend_from_slice(&u32::try_from(data_offset).unwrap_or(u32::MAX).to_le_bytes());
            values.extend_from_slice(text.as_bytes());
            values.push(0);
            data_offset += len;
            // Values start on word boundaries.
            if len % 2 == 1 {
                values.push(0);
                data_offset += 1;
            }
        }
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&values);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_ascii_tags(tiff: &[u8]) -> Vec<(u16, String)> {
        let u16_at = |o: usize| u16::from_le_bytes([tiff[o], tiff[o + 1]]);
        let u32_at = |o: usize| {
            u32::from_le_bytes([tiff[o], tiff[o + 1], tiff[o + 2], tiff[o + 3]]) as usize
        };
        assert_eq!(&tiff[..4], b"II*\0");
        let ifd = u32_at(4);
        (0..usize::from(u16_at(ifd)))
            .map(|i| {
                let e = ifd + 2 + 12 * i;
                assert_eq!(u16_at(e + 2), ASCII);
                let len = u32_at(e + 4);
                let at = if len <= 4 { e + 8 } else { u32_at(e + 8) };
                assert_eq!(tiff[at + len - 1], 0, "NUL-terminated");
                (
                    u16_at(e),
                    String::from_utf8(tiff[at..at + len - 1].to_vec()).expect("utf8"),
                )
            })
            .collect()
    }

    #[test]
    fn entries_are_sorted_and_read_back() {
        let tiff = build(&[
            (0x0110, "prompt:{}".into()),
            (0x010F, "workflow:{\"a\":1}".into()),
            (0x010E, "k:v".into()),
        ]);
        assert_eq!(
            read_ascii_tags(&tiff),
            [
                (0x010E, "k:v".to_owned()),
                (0x010F, "workflow:{\"a\":1}".to_owned()),
                (0x0110, "prompt:{}".to_owned())
            ]
        );
    }
}
