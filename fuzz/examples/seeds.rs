//! Writes the seed corpus (`veil_fuzz::seeds`) under the directory given,
//! one subdirectory per target, replacing what the seeds own there.
//! `cargo xtask fuzz --seeds` runs it on `fuzz/corpus`.

use std::{env, fs, path::PathBuf};

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env::args_os().nth(1).expect("usage: seeds DIR"));
    let seeds = veil_fuzz::seeds::all();
    let mut targets: Vec<&str> = seeds.iter().map(|s| s.target).collect();
    targets.dedup();
    for target in targets {
        let sub = dir.join(target);
        let _ = fs::remove_dir_all(&sub);
        fs::create_dir_all(&sub)?;
    }
    for seed in &seeds {
        fs::write(dir.join(seed.target).join(seed.name), &seed.bytes)?;
    }
    println!("{} seeds written under {}", seeds.len(), dir.display());
    Ok(())
}
