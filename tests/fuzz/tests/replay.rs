//! The bounded fuzz run of CI: every committed corpus and regression input, the seeds, then a
//! fixed number of mutations of them, through the same [`Target::run`] the fuzzer calls.
//!
//! Deterministic by default; `LUNA_FUZZ_SEED=<u64>` picks other mutations and
//! `LUNA_FUZZ_MUTATIONS=<n>` sets how many per target. An input that panics is written under
//! the test's temporary folder, so it can be replayed with `cargo fuzz run <target> <file>`.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use luna_fuzz::{Reach, Target};

/// Mutated inputs per target when `LUNA_FUZZ_MUTATIONS` is not set.
const DEFAULT_MUTATIONS: usize = 50_000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Files of `dir`, sorted; an absent folder has none.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("readable corpus folder").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).expect("readable corpus file");
            (p.display().to_string(), data)
        })
        .collect();
    out.sort();
    out
}

/// The dictionary the fuzzer uses for this target, as raw tokens.
fn dictionary(target: Target) -> Vec<Vec<u8>> {
    let name = match target {
        Target::RequestJson => "request_json",
        Target::RequestMsgpack | Target::TaskMsgpack => "msgpack",
        Target::Template => "template",
    };
    let text = std::fs::read_to_string(fuzz_dir().join(format!("dict/{name}.dict")))
        .expect("the target's dictionary in fuzz/dict");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix('"').map(unescape))
        .collect()
}

/// libFuzzer dictionary escapes: `\xNN`, `\\` and `\"`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'x')) if i + 4 <= b.len() => {
                let hex = std::str::from_utf8(&b[i + 2..i + 4]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                i += 4;
            }
            (b'\\', Some(&c)) => {
                out.push(c);
                i += 2;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// SplitMix64: tiny, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few libFuzzer-style mutations of `base`: bit flips, byte changes, insertions of random
/// bytes or dictionary tokens, deletions, duplications, splices with `other`, truncation.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8], dict: &[Vec<u8>]) -> Vec<u8> {
    let mut data = base.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] = rng.next() as u8;
            }
            2 => {
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            3 if !dict.is_empty() => {
                let token = dict[rng.below(dict.len())].clone();
                data.splice(at..at, token);
            }
            4 => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at.min(end)..end);
            }
            5 => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                let copy = data[at.min(end)..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, copy);
            }
            6 if !other.is_empty() => {
                let from = rng.below(other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => data.truncate(at),
        }
    }
    data
}

/// Runs one input; on a panic, keeps the input and says where.
fn run_one(target: Target, what: &str, data: &[u8]) -> Reach {
    match catch_unwind(AssertUnwindSafe(|| target.run(data))) {
        Ok(reach) => reach,
        Err(_) => {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).expect("folder for the failing input");
            let path = dir.join(format!("{}-{}", target.name(), data.len()));
            std::fs::write(&path, data).expect("failing input written");
            panic!(
                "{} panicked on {what}; the input is in {} (replay: cargo fuzz run {} <file>)",
                target.name(),
                path.display(),
                target.name()
            );
        }
    }
}

fn replay(target: Target) {
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    let corpus = files(&fuzz_dir().join("corpus").join(target.name()));
    assert!(
        !corpus.is_empty(),
        "no corpus for {} in fuzz/corpus: the replay would test nothing",
        target.name()
    );
    inputs.extend(corpus);
    inputs.extend(files(&fuzz_dir().join("regressions").join(target.name())));
    inputs.extend(
        luna_fuzz::seeds()
            .into_iter()
            .filter(|(t, _)| *t == target)
            .enumerate()
            .map(|(i, (_, data))| (format!("seed {i}"), data)),
    );

    let mut stages: BTreeMap<Reach, usize> = BTreeMap::new();
    for (what, data) in &inputs {
        *stages.entry(run_one(target, what, data)).or_default() += 1;
    }
    assert!(
        stages.get(&Reach::Placed).is_some_and(|&n| n > 0),
        "no input of {} got past every stage: {stages:?}",
        target.name()
    );

    let seed = env_number("LUNA_FUZZ_SEED", 0x6c75_6e61);
    let count = env_number("LUNA_FUZZ_MUTATIONS", DEFAULT_MUTATIONS as u64);
    let dict = dictionary(target);
    let mut rng = Rng(seed ^ target.name().len() as u64);
    let mut mutated: BTreeMap<Reach, usize> = BTreeMap::new();
    for n in 0..count {
        let base = &inputs[rng.below(inputs.len())].1;
        let other = &inputs[rng.below(inputs.len())].1;
        let data = mutate(&mut rng, base, other, &dict);
        let what = format!("mutation {n} of seed {seed}");
        *mutated.entry(run_one(target, &what, &data)).or_default() += 1;
    }
    println!(
        "{}: {} corpus inputs {stages:?}; {count} mutations (seed {seed}) {mutated:?}",
        target.name(),
        inputs.len()
    );
}

#[test]
fn request_json() {
    replay(Target::RequestJson);
}

#[test]
fn request_msgpack() {
    replay(Target::RequestMsgpack);
}

#[test]
fn task_msgpack() {
    replay(Target::TaskMsgpack);
}

#[test]
fn template() {
    replay(Target::Template);
}

#[test]
fn dictionary_escapes() {
    assert_eq!(unescape(r#"\x00a\"\\"#), b"\0a\"\\");
}
