//! Saves every image of a request file into an output folder, without any service:
//! `cargo run -p luna-store --example save_request -- REQUEST.json|REQUEST.msgpack OUTPUT_ROOT`.
//!
//! Prints one JSON line per image with its outcome. Used by the Pillow interop test, and handy
//! for checking what a request will produce.

use std::process::ExitCode;

use luna_job::codec::{from_json, from_msgpack};
use luna_job::{JobId, Limits, SaveRequest};
use luna_store::{LocalStore, Outcome, save_task};
use serde_json::json;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [request, root] = args.as_slice() else {
        return Err("usage: save_request REQUEST.json|REQUEST.msgpack OUTPUT_ROOT".into());
    };
    let bytes = std::fs::read(request)?;
    let req: SaveRequest = if request.ends_with(".msgpack") {
        from_msgpack(&bytes)?
    } else {
        from_json(&bytes)?
    };
    req.validate(&Limits::default())?;
    let job_id = JobId::new();
    let store = LocalStore::new(root);
    let mut failed = false;
    for task in req.into_tasks(&job_id, chrono::Local::now().fixed_offset()) {
        let line = match save_task(&task, &store, None) {
            Ok(Outcome::Saved {
                stored,
                quality_score,
            }) => {
                json!({"index": task.image_index, "outcome": "saved", "path": stored.path, "bytes": stored.bytes, "quality_score": quality_score})
            }
            Ok(Outcome::Rejected { score, stored, .. }) => {
                json!({"index": task.image_index, "outcome": "rejected", "quality_score": score, "path": stored.map(|s| s.path)})
            }
            Err(e) => {
                failed = true;
                json!({"index": task.image_index, "outcome": "failed", "error": e.to_string()})
            }
        };
        println!("{line}");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
