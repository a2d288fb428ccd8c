//! `kvtuner chat` on Gemma 3 270M: one-shot answers, save/load across processes, and the
//! interactive terminal driven through tmux.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kvtuner");
const PROFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/gemma3-270m-6.5bpv.yaml");

/// Gemma annotated with the shipped mixed profile, once per test process.
fn annotated(dir: &Path) -> PathBuf {
    let out = dir.join("gemma-annotated.gguf");
    let st = Command::new(BIN)
        .args(["annotate", common::gemma_path().to_str().unwrap(), "--profile", PROFILE, "-o", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    out
}

fn one_shot(model: &Path, extra: &[&str]) -> serde_json::Value {
    one_shot_prompt(model, "What is the capital of France?", extra)
}

fn one_shot_prompt(model: &Path, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["chat", "-m", model.to_str().unwrap(), "--temp", "0", "-n", "48", "--json", "-p", prompt])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn one_shot_answers_paris_with_and_without_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let model = annotated(dir.path());
    let profile = kvtuner::profile::Profile::load(PROFILE).unwrap();
    let with = one_shot(&model, &[]);
    assert!(with["text"].as_str().unwrap().contains("Paris"), "{with}");
    assert!(with["profile"]["name"].as_str().unwrap().contains(&profile.name));
    let k: Vec<&str> = with["profile"]["type_k"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(k, profile.layers.iter().map(|l| l.k.name()).collect::<Vec<_>>());
    assert!(with["timings"]["generation_tokens_per_s"].as_f64().unwrap() > 0.0);

    let off = one_shot(&model, &["--kv-profile", "off"]);
    assert!(off["text"].as_str().unwrap().contains("Paris"), "{off}");
    assert!(off["profile"]["type_k"].as_array().unwrap().iter().all(|t| t == "f16"));
}

/// Runs the chat with `input` on stdin (rustyline reads lines when stdin is not a terminal).
fn scripted(model: &Path, input: &str) -> String {
    let mut child = Command::new(BIN)
        .args(["chat", "-m", model.to_str().unwrap(), "--temp", "0", "-n", "40", "-c", "1024"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn save_then_load_in_a_new_process_continues_with_the_same_kv_state() {
    let dir = tempfile::tempdir().unwrap();
    let model = annotated(dir.path());
    let state = dir.path().join("conv.state");
    let s = state.to_str().unwrap();
    let first =
        scripted(&model, &format!("What is the capital of France?\n/save {s}\n/stats\nAnd the capital of Italy?\n"));
    let second = scripted(&model, &format!("/load {s}\n/stats\nAnd the capital of Italy?\n"));
    assert!(first.contains("saved KV state"), "{first}");
    assert!(second.contains("loaded 2 messages"), "{second}");
    let context = |out: &str| {
        out.lines()
            .find(|l| l.contains("context "))
            .map(|l| l.split("context ").nth(1).unwrap().split('/').next().unwrap().to_string())
    };
    assert_eq!(context(&first), context(&second), "same tokens in the cache after /load");
    // stdin is not a terminal, so input is not echoed: answers follow the "> " prompts
    let last_answer = |out: &str| {
        out.lines()
            .map(|l| l.trim_start_matches("> ").trim())
            .rfind(|l| {
                !l.is_empty()
                    && *l != ">"
                    && !l.starts_with('(')
                    && !l.starts_with("last reply:")
                    && !l.starts_with("profile:")
                    && !l.starts_with("commands:")
            })
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(last_answer(&first), last_answer(&second), "greedy continuation is identical");
    assert!(last_answer(&second).contains("Rome"), "{second}");
}

/// The screen's last line that is not blank.
fn last_line(screen: &str) -> Option<&str> {
    screen.lines().rev().find(|l| !l.trim().is_empty())
}

/// The screen ends with an empty input prompt: the program waits for a line.
fn at_prompt(screen: &str) -> bool {
    last_line(screen).is_some_and(|l| l.trim_end() == ">")
}

struct Tmux {
    name: String,
}

impl Tmux {
    fn send(&self, keys: &[&str]) {
        let st = Command::new("tmux").args(["send-keys", "-t", &self.name]).args(keys).status().unwrap();
        assert!(st.success());
    }
    /// Types a line at the input prompt. The line editor discards keys that arrive before it
    /// takes the terminal (switching to raw mode flushes pending input), so wait for the prompt
    /// and for the echo, typing again if the first keys were dropped.
    fn enter_line(&self, text: &str) {
        self.wait_for(at_prompt, 60, "the input prompt");
        let echoed = |s: &str| last_line(s).is_some_and(|l| l.ends_with(text));
        for _ in 0..3 {
            self.send(&["-l", text]);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if echoed(&self.screen()) {
                    self.send(&["Enter"]);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            self.send(&["C-u"]); // whatever arrived of it
        }
        panic!("`{text}` never showed at the prompt:\n{}", self.screen());
    }
    fn screen(&self) -> String {
        let out =
            Command::new("tmux").args(["capture-pane", "-p", "-J", "-S", "-200", "-t", &self.name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn wait_for(&self, what: impl Fn(&str) -> bool, secs: u64, label: &str) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if what(&s) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(secs) {
                panic!("timed out waiting for {label}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.name]).status();
    }
}

#[test]
fn interactive_chat_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let model = annotated(dir.path());
    let exit_file = dir.path().join("exit");
    let tmux = Tmux { name: format!("kvtuner-test-{}", std::process::id()) };
    let cmd = format!(
        "{BIN} chat -m {} --temp 0 -c 2048 -n 400; echo $? > {}; sleep 60",
        model.display(),
        exit_file.display()
    );
    let st = Command::new("tmux")
        .args(["new-session", "-d", "-s", &tmux.name, "-x", "160", "-y", "50", &cmd])
        .status()
        .unwrap();
    assert!(st.success(), "tmux is needed for this test");
    let profile = kvtuner::profile::Profile::load(PROFILE).unwrap();

    tmux.wait_for(|s| s.contains(&format!("profile: {}", profile.name)) && at_prompt(s), 60, "the banner");
    tmux.enter_line("What is the capital of France?");
    // input typed while the model answers would end up in the transcript: wait for the prompt
    tmux.wait_for(|s| s.contains("Paris") && at_prompt(s), 60, "the answer");

    tmux.enter_line("/profile");
    let s = tmux.wait_for(|s| s.contains("layer  17:") && at_prompt(s), 30, "/profile");
    for (il, l) in profile.layers.iter().enumerate() {
        let line = format!("layer {il:>3}: K {:<5} V {:<5}", l.k.name(), l.v.name());
        assert!(s.contains(&line), "missing `{line}` in\n{s}");
    }

    // Ctrl-C stops the answer, not the program. Whether the 270M model's greedy answer outlasts the
    // wait depends on the prompt and the conversation so far (after the exchange above every one
    // of these got a one-line answer), so start afresh and try them in turn: the first answer
    // still running when Ctrl-C arrives is interrupted. (A Ctrl-C after the answer only clears
    // the input line.)
    let prompts = [
        "Count from 1 to 100, separated by commas.",
        "List the first fifty prime numbers, separated by commas.",
        "Write a long story about a dragon who learns to fly.",
        "Explain in detail how a car engine works, step by step.",
    ];
    // a fresh conversation: the first of these prompts then runs to the 400-token limit (~9 s)
    tmux.enter_line("/reset");
    let mut interrupted = false;
    for prompt in prompts {
        let before = tmux.screen().matches("(interrupted)").count();
        tmux.enter_line(prompt);
        // The first piece of the answer on screen (or, for a short one, the next prompt).
        let s = tmux.wait_for(|s| last_line(s).is_some_and(|l| !l.ends_with(prompt)), 60, "the answer to start");
        if at_prompt(&s) {
            continue; // answered in full before it could be interrupted
        }
        tmux.send(&["C-c"]);
        let s = tmux.wait_for(
            |s| s.matches("(interrupted)").count() > before || (s.contains("(Ctrl-C:") && at_prompt(s)),
            60,
            "the interruption or the end of the answer",
        );
        if s.matches("(interrupted)").count() > before {
            interrupted = true;
            break;
        }
        tmux.wait_for(at_prompt, 30, "the prompt");
    }
    assert!(interrupted, "no answer was still running when Ctrl-C arrived:\n{}", tmux.screen());
    tmux.wait_for(at_prompt, 30, "the prompt after Ctrl-C");
    tmux.enter_line("/stats");
    tmux.wait_for(|s| s.contains("last reply:"), 30, "/stats after Ctrl-C");

    // EOF quits cleanly.
    tmux.send(&["C-d"]);
    let start = Instant::now();
    while !exit_file.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap().trim(), "0");
}

/// Qwen2.5-Coder-0.5B-Instruct chats through its own (ChatML) template and answers.
#[test]
fn qwen_chats_through_its_own_template() {
    let qwen = kvtuner::assets::ensure(&kvtuner::assets::cache_dir(), &kvtuner::assets::QWEN_CODER_MODEL)
        .expect("fetching Qwen2.5-Coder-0.5B-Instruct (see README)");
    let json = one_shot_prompt(&qwen, "What is 2+3? Reply with the number only.", &["-c", "512"]);
    assert_eq!(json["template"], "the model's chat template");
    let transcript = json["transcript"].as_str().unwrap();
    assert!(
        transcript.contains("<|im_start|>user\nWhat is 2+3? Reply with the number only.<|im_end|>"),
        "{transcript}"
    );
    assert!(transcript.contains("<|im_start|>assistant\n"), "{transcript}");
    assert!(json["text"].as_str().unwrap().contains('5'), "{json}");
    assert_eq!(json["profile"]["type_k"].as_array().unwrap().len(), 24);
}
