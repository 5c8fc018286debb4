//! The construir-init binary outside a VM.

#[test]
fn the_binary_refuses_to_run_except_as_pid_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_construir-init")).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only runs as PID 1"));
}
