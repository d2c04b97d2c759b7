//! The `mts-backup` binary's exit codes and messages for what needs no
//! server: usage, settings, and a backup directory that is not one.

use std::process::Command;

fn mts_backup(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mts-backup"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn usage_and_settings_errors_exit_2() {
    let (code, stderr) = mts_backup(&["backup"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--to"), "{stderr}");
    let (code, stderr) = mts_backup(
        &["backup", "--to", "/nonexistent/never"],
        &[("MINIO_USE_SSL", "maybe")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("minio_use_ssl"), "{stderr}");
}

#[test]
fn a_directory_without_a_manifest_is_not_restored() {
    let empty = std::env::temp_dir().join(format!("mts-no-backup-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let target = empty.join("tarantool");
    let (code, stderr) = mts_backup(
        &[
            "restore",
            "--from",
            empty.to_str().unwrap(),
            "--tarantool-dir",
            target.to_str().unwrap(),
        ],
        &[],
    );
    std::fs::remove_dir_all(&empty).unwrap();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("manifest"), "{stderr}");
    assert!(!target.exists(), "nothing is written for a damaged backup");
}
