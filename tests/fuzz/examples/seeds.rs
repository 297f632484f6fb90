//! Writes the seed inputs into a corpus folder: `cargo run -p luna-fuzz --example seeds -- fuzz/corpus`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for (i, (target, data)) in luna_fuzz::seeds().into_iter().enumerate() {
        let dir = root.join(target.name());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{i}")), data)?;
    }
    Ok(())
}
