//! `veil-user client add --out FILE`: the profile holds the client's key, so
//! it goes only into a new 0600 file, never into an existing file or
//! through a symlink, unless `--force` replaces it.

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("veil-client-add-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn veil_user(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veil-user"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

fn add(state: &Path, name: &str, out: &Path, force: bool) -> Output {
    let mut args = vec![
        "client",
        "add",
        name,
        "--endpoint",
        "198.18.0.1:443",
        "--out",
        out.to_str().unwrap(),
    ];
    if force {
        args.push("--force");
    }
    veil_user(state, &args)
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn an_existing_profile_path_is_refused_and_nothing_is_issued() {
    let dir = temp("existing");
    let state = dir.join("state");
    let out = dir.join("alice.veil");
    fs::write(&out, "old").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();

    let o = add(&state, "alice", &out, false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("already exists"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(fs::read_to_string(&out).unwrap(), "old");
    assert_eq!(mode(&out), 0o644);
    let list = veil_user(&state, &["client", "list"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("alice"),
        "a refused --out issues no client"
    );

    // With --force the same name is issued and replaces the file, 0600.
    let o = add(&state, "alice", &out, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs::read_to_string(&out).unwrap().contains("PRIVATE KEY"));
    assert_eq!(mode(&out), 0o600);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_symlink_is_never_followed() {
    let dir = temp("symlink");
    let state = dir.join("state");
    let target = dir.join("readable-by-all");
    fs::write(&target, "").unwrap();
    let out = dir.join("bob.veil");
    symlink(&target, &out).unwrap();

    let o = add(&state, "bob", &out, false);
    assert!(!o.status.success());
    assert_eq!(fs::read_to_string(&target).unwrap(), "");

    let o = add(&state, "bob", &out, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read_to_string(&target).unwrap(), "", "not followed");
    assert!(fs::symlink_metadata(&out).unwrap().is_file());
    assert_eq!(mode(&out), 0o600);
    fs::remove_dir_all(dir).unwrap();
}
