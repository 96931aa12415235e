//! `qimg --generate-docs DIR`: man pages and shell completions generated from qimg's clap
//! definitions, naming every command qimg has (as `qimg --help` lists them).

mod common;

use common::Scratch;

/// The commands `qimg --help` lists.
fn commands(s: &Scratch) -> Vec<String> {
    let help = s.qimg(&["--help"]);
    let listed: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(listed.len() >= 20, "commands in --help: {listed:?}");
    listed
}

#[test]
fn man_pages_and_completions_name_every_command() {
    let s = Scratch::new();
    let commands = commands(&s);
    for expected in ["convert", "dd", "commit", "bitmap", "snapshot"] {
        assert!(commands.iter().any(|c| c == expected), "{expected}");
    }
    let listed = s.qimg(&["--generate-docs", "docs"]);
    let read = |name: &str| {
        std::fs::read_to_string(s.path(&format!("docs/{name}")))
            .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
    };
    let main = read("qimg.1");
    assert!(
        main.starts_with(".ie"),
        "not roff: {}",
        &main[..40.min(main.len())]
    );
    assert!(main.contains(".TH qimg 1"), "title line");
    let (bash, zsh, fish) = (read("qimg.bash"), read("_qimg"), read("qimg.fish"));
    for command in &commands {
        let page = format!("qimg-{command}.1");
        assert!(
            listed.lines().any(|l| l.ends_with(&page)),
            "{page} not listed"
        );
        let text = read(&page);
        assert!(text.contains(&format!(".TH qimg-{command} 1")), "{page}");
        assert!(
            main.contains(&format!("qimg\\-{command}(1)")),
            "qimg.1 lacks {command}"
        );
        assert!(
            bash.contains(&format!("qimg,{command})")),
            "bash lacks {command}"
        );
        assert!(zsh.contains(&format!("'{command}:")), "zsh lacks {command}");
        assert!(
            fish.contains(&format!("-a \"{command}\"")),
            "fish lacks {command}"
        );
    }
    // The bash completion is valid bash.
    if let Ok(check) = std::process::Command::new("bash")
        .arg("-n")
        .arg(s.path("docs/qimg.bash"))
        .output()
    {
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // Options come through too: convert's page documents -n and --target-is-zero.
    let convert = read("qimg-convert.1");
    assert!(convert.contains("\\-\\-no\\-create") && convert.contains("\\-\\-target\\-is\\-zero"));
    // A second run overwrites; a missing argument is a one-line error.
    s.qimg(&["--generate-docs", "docs"]);
    let out = s.qimg_output(&["--generate-docs"]);
    common::assert_one_line_failure(&out, "--generate-docs without DIR");
    assert_eq!(out.status.code(), Some(1));
}
