//! A minimal EXIF (TIFF) writer: one IFD0 of ASCII entries, little-endian, and optionally an
//! Exif sub-IFD holding `UserComment`.
//!
//! That is all ComfyUI's scheme (IFD0 ASCII `key:value` entries) and A1111's (`parameters` in
//! `UserComment`) need, and writing it directly avoids pulling in a general EXIF library. The
//! output has no `Exif\0\0` prefix: WebP's `EXIF` chunk takes the TIFF data as is, and JPEG's
//! APP1 prefix is added by the JPEG encoder.

/// TIFF type code for ASCII (NUL-terminated bytes).
const ASCII: u16 = 2;
/// TIFF type code for LONG (u32).
const LONG: u16 = 4;
/// TIFF type code for UNDEFINED (raw bytes).
const UNDEFINED: u16 = 7;

/// IFD0 tag pointing at the Exif sub-IFD.
pub const EXIF_IFD_POINTER: u16 = 0x8769;
/// Exif sub-IFD tag of the user comment, where A1111 keeps its `parameters`.
pub const USER_COMMENT: u16 = 0x9286;

/// Builds a TIFF structure holding `entries` as ASCII tags of IFD0.
///
/// Entries are sorted by tag, as TIFF requires; with duplicate tags the first one wins. Text is
/// written as UTF-8 (JSON from [`crate::metadata`] is pure ASCII already).
pub fn build(entries: &[(u16, String)]) -> Vec<u8> {
    build_with_user_comment(entries, None)
}

/// [`build`], plus `user_comment` (already prefixed, see [`user_comment`]) as tag 0x9286 of an
/// Exif sub-IFD that IFD0 points to with 0x8769, where EXIF readers (Pillow's
/// `get_ifd(0x8769)`, piexif, exiftool) find it.
pub fn build_with_user_comment(entries: &[(u16, String)], user_comment: Option<&[u8]>) -> Vec<u8> {
    let mut sorted: Vec<&(u16, String)> = entries
        .iter()
        .filter(|(tag, _)| user_comment.is_none() || *tag != EXIF_IFD_POINTER)
        .collect();
    sorted.sort_by_key(|(tag, _)| *tag);
    sorted.dedup_by_key(|(tag, _)| *tag);
    let count = sorted.len() + usize::from(user_comment.is_some());
    // Header (8) + entry count (2) + entries (12 each) + next-IFD offset (4), then the values.
    let mut data_offset = 8 + 2 + 12 * count + 4;
    let mut out = Vec::with_capacity(
        data_offset
            + entries.iter().map(|(_, s)| s.len() + 2).sum::<usize>()
            + user_comment.map_or(0, |c| c.len() + 20),
    );
    out.extend_from_slice(b"II*\0");
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&u16::try_from(count).unwrap_or(u16::MAX).to_le_bytes());
    let mut values = Vec::new();
    for (tag, text) in &sorted {
        let len = text.len() + 1; // with the NUL
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&ASCII.to_le_bytes());
        out.extend_from_slice(&u32_len(len));
        if len <= 4 {
            let mut inline = [0u8; 4];
            inline[..text.len()].copy_from_slice(text.as_bytes());
            out.extend_from_slice(&inline);
        } else {
            out.extend_from_slice(&u32_len(data_offset));
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
    if let Some(comment) = user_comment {
        // The pointer sorts last: every ComfyUI tag is below 0x8769. The sub-IFD follows the
        // IFD0 values: entry count, one entry, next-IFD offset, then the comment's bytes.
        let sub_ifd = data_offset;
        out.extend_from_slice(&EXIF_IFD_POINTER.to_le_bytes());
        out.extend_from_slice(&LONG.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&u32_len(sub_ifd));
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&values);
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&USER_COMMENT.to_le_bytes());
        out.extend_from_slice(&UNDEFINED.to_le_bytes());
        out.extend_from_slice(&u32_len(comment.len()));
        if comment.len() <= 4 {
            let mut inline = [0u8; 4];
            inline[..comment.len()].copy_from_slice(comment);
            out.extend_from_slice(&inline);
            out.extend_from_slice(&0u32.to_le_bytes());
        } else {
            out.extend_from_slice(&u32_len(sub_ifd + 2 + 12 + 4));
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(comment);
        }
        return out;
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&values);
    out
}

fn u32_len(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes()
}

/// A `UserComment` value: the 8-byte character code, then the text. ASCII text gets
/// `ASCII\0\0\0` and its bytes; any other text `UNICODE\0` and UTF-16 **big-endian**, as
/// piexif writes and reads it (`piexif.helper.UserComment`, which A1111 uses for both), whatever
/// the TIFF byte order.
pub fn user_comment(text: &str) -> Vec<u8> {
    if text.is_ascii() {
        let mut out = Vec::with_capacity(8 + text.len());
        out.extend_from_slice(b"ASCII\0\0\0");
        out.extend_from_slice(text.as_bytes());
        out
    } else {
        let mut out = Vec::with_capacity(8 + 2 * text.len());
        out.extend_from_slice(b"UNICODE\0");
        for unit in text.encode_utf16() {
            out.extend_from_slice(&unit.to_be_bytes());
        }
        out
    }
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
            .map(|i| ifd + 2 + 12 * i)
            .filter(|&e| u16_at(e) != EXIF_IFD_POINTER)
            .map(|e| {
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

    #[test]
    fn user_comment_sits_in_the_exif_sub_ifd() {
        let u16_at = |t: &[u8], o: usize| u16::from_le_bytes([t[o], t[o + 1]]);
        let u32_at =
            |t: &[u8], o: usize| u32::from_le_bytes([t[o], t[o + 1], t[o + 2], t[o + 3]]) as usize;
        for text in ["Steps: 20, Seed: 1", "café ☕ 𝄞"] {
            let comment = user_comment(text);
            let tiff = build_with_user_comment(
                &[
                    (0x0110, "prompt:{}".into()),
                    (0x010F, "parameters:x".into()),
                ],
                Some(&comment),
            );
            // IFD0: the two ASCII entries, then the pointer.
            let ifd = u32_at(&tiff, 4);
            assert_eq!(u16_at(&tiff, ifd), 3);
            let last = ifd + 2 + 12 * 2;
            assert_eq!(u16_at(&tiff, last), EXIF_IFD_POINTER);
            assert_eq!(u16_at(&tiff, last + 2), LONG);
            assert_eq!(u32_at(&tiff, ifd + 2 + 36), 0, "no next IFD");
            let sub = u32_at(&tiff, last + 8);
            assert_eq!(u16_at(&tiff, sub), 1);
            assert_eq!(u16_at(&tiff, sub + 2), USER_COMMENT);
            assert_eq!(u16_at(&tiff, sub + 4), UNDEFINED);
            let len = u32_at(&tiff, sub + 6);
            let at = u32_at(&tiff, sub + 10);
            assert_eq!(&tiff[at..at + len], comment.as_slice());
            // The ASCII entries still read back as before.
            assert_eq!(read_ascii_tags(&tiff[..]).len(), 2);
        }
        assert_eq!(&user_comment("ab")[..], b"ASCII\0\0\0ab");
        assert_eq!(&user_comment("é")[..], b"UNICODE\0\x00\xe9");
    }
}
