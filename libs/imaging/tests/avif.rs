//! AVIF files: the container read box by box, and the EXIF read back the way the stock ComfyUI
//! frontend reads it (`getFromAvifFile`): major brand `avif`, `infe` version 2, `iloc` extents
//! as 32-bit absolute offsets (first extent only), TIFF found by scanning the item, IFD0 ASCII
//! entries split at the first `:`. Pixels are decoded by Pillow in tests/interop.

use luna_imaging::avif::{AvifError, encode};
use luna_imaging::exif;
use luna_imaging::metadata::{Entry, EntryValue, Metadata};
use proptest::prelude::*;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Child boxes of `b[start..end]` as (type, body start, end).
fn boxes(b: &[u8], start: usize, end: usize) -> Vec<([u8; 4], usize, usize)> {
    let mut out = Vec::new();
    let mut at = start;
    while at + 8 <= end {
        let size = u32_at(b, at) as usize;
        assert!(size >= 8 && at + size <= end, "32-bit box sizes that fit");
        let kind: [u8; 4] = b[at + 4..at + 8].try_into().expect("4 bytes");
        out.push((kind, at + 8, at + size));
        at += size;
    }
    assert_eq!(at, end, "boxes fill their parent");
    out
}

fn child(b: &[u8], start: usize, end: usize, kind: &[u8; 4]) -> (usize, usize) {
    let found: Vec<_> = boxes(b, start, end)
        .into_iter()
        .filter(|(k, _, _)| k == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {}", String::from_utf8_lossy(kind));
    (found[0].1, found[0].2)
}

/// What the file holds, read as the frontend and a plain HEIF reader would.
#[derive(Debug)]
struct Parsed {
    /// (item id, item type), from `iinf`.
    items: Vec<(u16, [u8; 4])>,
    /// (from, reference type, to), from `iref`.
    refs: Vec<(u16, [u8; 4], u16)>,
    /// `ispe` width and height (of the first one: the colour image's).
    size: (u32, u32),
    /// The Exif item's first extent, as absolute file bytes, and how many extents it has.
    exif: Option<(Vec<u8>, u16)>,
}

fn parse(file: &[u8]) -> Parsed {
    let top = boxes(file, 0, file.len());
    assert_eq!(&top[0].0, b"ftyp", "ftyp first");
    assert_eq!(&file[8..12], b"avif", "major brand avif");
    let (meta, meta_end) = child(file, 0, file.len(), b"meta");
    assert!(
        boxes(file, 0, file.len())
            .iter()
            .any(|(k, _, _)| k == b"mdat")
    );
    let meta = meta + 4; // FullBox

    let (iinf, iinf_end) = child(file, meta, meta_end, b"iinf");
    assert_eq!(file[iinf], 0, "iinf version 0");
    let count = usize::from(u16_at(file, iinf + 4));
    let entries = boxes(file, iinf + 6, iinf_end);
    assert_eq!(entries.len(), count);
    let items: Vec<(u16, [u8; 4])> = entries
        .iter()
        .map(|&(kind, body, _)| {
            assert_eq!(&kind, b"infe");
            assert_eq!(file[body], 2, "infe version 2, as the frontend requires");
            (
                u16_at(file, body + 4),
                file[body + 8..body + 12].try_into().expect("4 bytes"),
            )
        })
        .collect();

    let (iloc, _) = child(file, meta, meta_end, b"iloc");
    assert_eq!(file[iloc], 0, "iloc version 0");
    assert_eq!(file[iloc + 4], 0x44, "offset_size 4, length_size 4");
    assert_eq!(file[iloc + 5] >> 4, 0, "base_offset_size 0");
    let mut at = iloc + 8;
    let mut extents = Vec::new();
    for _ in 0..u16_at(file, iloc + 6) {
        let id = u16_at(file, at);
        let n = u16_at(file, at + 4);
        let first = (
            u32_at(file, at + 6) as usize,
            u32_at(file, at + 10) as usize,
        );
        extents.push((id, first, n));
        at += 6 + 8 * usize::from(n);
    }
    let exif = items
        .iter()
        .find(|(_, kind)| kind == b"Exif")
        .map(|(id, _)| {
            let &(_, (offset, len), n) = extents
                .iter()
                .find(|(item, _, _)| item == id)
                .expect("Exif item located");
            (file[offset..offset + len].to_vec(), n)
        });

    // No `iref` when nothing refers to anything (one image, no EXIF).
    let refs = boxes(file, meta, meta_end)
        .into_iter()
        .filter(|(k, _, _)| k == b"iref")
        .flat_map(|(_, iref, iref_end)| boxes(file, iref + 4, iref_end))
        .map(|(kind, body, _)| (u16_at(file, body), kind, u16_at(file, body + 4)))
        .collect();

    let (iprp, iprp_end) = child(file, meta, meta_end, b"iprp");
    let (ipco, ipco_end) = child(file, iprp, iprp_end, b"ipco");
    let (ispe, _) = boxes(file, ipco, ipco_end)
        .into_iter()
        .find(|(k, _, _)| k == b"ispe")
        .map(|(_, b, e)| (b, e))
        .expect("ispe");
    let size = (u32_at(file, ispe + 4), u32_at(file, ispe + 8));
    Parsed {
        items,
        refs,
        size,
        exif,
    }
}

/// IFD0 ASCII entries split at the first `:`, as the frontend reads them (tag ignored).
fn frontend_exif(item: &[u8]) -> Vec<(String, String)> {
    let start = item
        .windows(4)
        .position(|w| w == b"II*\0" || w == b"MM\0*")
        .expect("TIFF header in the item");
    let tiff = &item[start..];
    assert_eq!(&tiff[..2], b"II", "little-endian, as exif::build writes");
    let le16 = |o: usize| usize::from(u16::from_le_bytes([tiff[o], tiff[o + 1]]));
    let le32 = |o: usize| u32::from_le_bytes(tiff[o..o + 4].try_into().expect("4")) as usize;
    let ifd = le32(4);
    (0..le16(ifd))
        .filter_map(|i| {
            let e = ifd + 2 + 12 * i;
            (le16(e + 2) == 2).then(|| {
                let (count, offset) = (le32(e + 4), le32(e + 8));
                let text =
                    String::from_utf8(tiff[offset..offset + count - 1].to_vec()).expect("utf-8");
                let (k, v) = text.split_once(':').expect("key:value");
                (k.to_owned(), v.to_owned())
            })
        })
        .collect()
}

fn photo(channels: u8) -> (Vec<u8>, u32, u32) {
    let img = image::load_from_memory(include_bytes!("../../../tests/data/astronaut_256.png"))
        .expect("test photo")
        .to_rgb8();
    let (w, h) = img.dimensions();
    let pixels = img
        .pixels()
        .enumerate()
        .flat_map(|(i, p)| match channels {
            1 => vec![p[1]],
            3 => p.0.to_vec(),
            _ => vec![p[0], p[1], p[2], (i % 256) as u8],
        })
        .collect();
    (pixels, w, h)
}

fn comfy_metadata(workflow: &str) -> Metadata {
    let text = |key: &str, value: &str| Entry {
        key: key.to_owned(),
        value: EntryValue::Text(value.to_owned()),
    };
    Metadata {
        entries: vec![
            text(
                "prompt",
                r#"{"3":{"class_type":"KSampler","inputs":{"seed":7}}}"#,
            ),
            text("workflow", workflow),
            text("luna_job_id", "job-42"),
        ],
    }
}

#[test]
fn exif_sits_where_the_frontend_reads_it() {
    let workflow = format!(
        "{{\"nodes\":[{}]}}",
        (0..30_000)
            .map(|i| format!("{{\"id\":{i}}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(workflow.len() > 300_000, "a large workflow");
    let meta = comfy_metadata(&workflow);
    let tiff = exif::build(&meta.exif_entries());
    let (pixels, w, h) = photo(3);
    let file = encode(&pixels, w, h, 3, 90, Some(&tiff)).expect("encodes");
    let parsed = parse(&file);
    assert_eq!(parsed.size, (w, h));

    let (item, extents) = parsed.exif.expect("an Exif item");
    assert_eq!(extents, 1, "one extent: the frontend reads only the first");
    assert_eq!(
        &item[..4],
        &[0, 0, 0, 0],
        "tiff header offset 0, as ComfyUI writes"
    );
    assert_eq!(&item[4..], &tiff[..], "then the TIFF data as built");
    let exif_id = parsed
        .items
        .iter()
        .find(|(_, k)| k == b"Exif")
        .map(|(id, _)| *id)
        .expect("Exif id");
    let color_id = parsed
        .items
        .iter()
        .find(|(_, k)| k == b"av01")
        .map(|(id, _)| *id)
        .expect("image id");
    assert!(parsed.refs.contains(&(exif_id, *b"cdsc", color_id)));

    let read = frontend_exif(&item);
    let get = |k: &str| {
        read.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        get("prompt").as_deref(),
        Some(r#"{"3":{"class_type":"KSampler","inputs":{"seed":7}}}"#)
    );
    assert_eq!(get("workflow"), Some(workflow));
    assert_eq!(get("luna_job_id").as_deref(), Some("job-42"));
}

#[test]
fn without_exif_there_is_no_exif_item() {
    let (pixels, w, h) = photo(3);
    let parsed = parse(&encode(&pixels, w, h, 3, 80, None).expect("encodes"));
    assert!(parsed.exif.is_none());
    assert_eq!(parsed.items.len(), 1);
}

#[test]
fn alpha_is_an_auxiliary_image_and_gray_encodes() {
    let (rgba, w, h) = photo(4);
    let parsed = parse(&encode(&rgba, w, h, 4, 90, None).expect("encodes"));
    let av01: Vec<u16> = parsed
        .items
        .iter()
        .filter(|(_, k)| k == b"av01")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(av01.len(), 2, "colour and alpha images");
    assert!(parsed.refs.contains(&(av01[1], *b"auxl", av01[0])));

    // Fully opaque RGBA needs no alpha image.
    let opaque: Vec<u8> = rgba
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    let parsed = parse(&encode(&opaque, w, h, 4, 90, None).expect("encodes"));
    assert_eq!(parsed.items.len(), 1);

    let (gray, w, h) = photo(1);
    assert_eq!(
        parse(&encode(&gray, w, h, 1, 90, None).expect("encodes")).size,
        (w, h)
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert!(matches!(
        encode(&[0; 5], 1, 2, 3, 90, None),
        Err(AvifError::Shape { len: 5, .. })
    ));
    assert!(matches!(
        encode(&[0; 3], 1, 1, 2, 90, None),
        Err(AvifError::Shape { .. })
    ));
    assert!(matches!(
        encode(&[0; 3], 1, 1, 3, 90, Some(b"Exif\0\0II*\0")),
        Err(AvifError::ExifNotTiff)
    ));
    // Out-of-range qualities are clamped, not refused.
    for q in [0, 101, 255] {
        encode(&[9; 12], 2, 2, 3, q, None).expect("encodes");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_small_shape_encodes(
        (w, h, channels, pixels) in (1u32..=40, 1u32..=40, prop::sample::select(vec![1u8, 3, 4]))
            .prop_flat_map(|(w, h, c)| {
                let n = (w * h * u32::from(c)) as usize;
                (Just(w), Just(h), Just(c), prop::collection::vec(any::<u8>(), n))
            }),
        quality in 70u8..=100,
    ) {
        let tiff = exif::build(&comfy_metadata("{}").exif_entries());
        let file = encode(&pixels, w, h, channels, quality, Some(&tiff)).expect("encodes");
        let parsed = parse(&file);
        prop_assert_eq!(parsed.size, (w, h));
        let (item, _) = parsed.exif.expect("Exif item");
        prop_assert_eq!(&item[4..], &tiff[..]);
    }
}
