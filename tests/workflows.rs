//! The seeds' snapshot workflows end to end (`scripts/workflows.sh`): external snapshots
//! created, listed, deleted from the middle and from the bottom, a revert, internal
//! snapshots beside them; each step checked against qemu-img by the script.

mod common;

#[test]
fn the_snapshot_workflows_script_passes() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/workflows.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(common::qimg_path())
        .output()
        .expect("running scripts/workflows.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "workflows.sh failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every step matched qemu-img"), "{stdout}");
    assert_eq!(stdout.matches("\n== ").count() + 1, 8, "{stdout}");
}
