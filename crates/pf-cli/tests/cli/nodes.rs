//! Training over several machines, as processes on this one: two nodes of one device end with
//! the weights of one node of two devices, bit for bit; two nodes of two devices each (replicas
//! on the CPU) log what one node of four does, and a stopped two-node run resumes bit for bit
//! where the uninterrupted one ends (the second node keeps nothing; the master sends it the
//! checkpoint); a node that dies ends the others with an error that names it.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use pf_models::weights::{load_pf, read_pf_config};

use super::repo;

type Cpu = burn::backend::NdArray;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pf-nodes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `pf train` on a slice of the digits, output in `out`, with `extra` flags; its standard
/// output and error go to `out.log`.
fn start(out: &Path, extra: &[String]) -> Child {
    let data = repo().join("data/mnist10k").display().to_string();
    let mut args: Vec<String> = ["train", "--quiet", "--data", &data, "--train-limit", "96", "--val-limit", "40", "--batch-size", "24", "--seed", "3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--out".to_string(), out.display().to_string()]);
    args.extend(extra.iter().cloned());
    let log = File::create(out.with_extension("log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_pf")).args(&args).env("RUST_BACKTRACE", "0").stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("pf starts")
}

fn log_of(out: &Path) -> String {
    std::fs::read_to_string(out.with_extension("log")).unwrap_or_default()
}

/// Waits for `child` at most `limit` (then kills it); its exit code, `None` if it was killed.
fn finish(child: &mut Child, limit: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The flags of `rank` in a run of two nodes of two devices each (unless `extra` says).
fn node(rank: usize, port: u16, extra: &[&str]) -> Vec<String> {
    let devices: &[&str] = if extra.contains(&"--devices") { &[] } else { &["--devices", "0,1"] };
    let mut f = flags(devices);
    f.extend(flags(&["--nodes", "2", "--master", &format!("127.0.0.1:{port}"), "--node-timeout", "30"]));
    f.extend(["--node-rank".to_string(), rank.to_string()]);
    f.extend(flags(extra));
    f
}

/// Runs both nodes to their end; both must succeed.
fn run_two(master: &Path, other: &Path, extra: &[&str]) {
    let port = free_port();
    let mut a = start(master, &node(0, port, extra));
    let mut b = start(other, &node(1, port, extra));
    let limit = Duration::from_secs(600);
    let (ca, cb) = (finish(&mut a, limit), finish(&mut b, limit));
    assert_eq!((ca, cb), (Some(0), Some(0)), "node 0:\n{}\nnode 1:\n{}", log_of(master), log_of(other));
}

fn weights(model: &Path) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().into_data().convert::<f32>().to_vec().unwrap());
        }
    }
    let config = read_pf_config(model).unwrap();
    let model = load_pf(config.init::<Cpu>(&Default::default()).unwrap(), model).unwrap();
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

fn train_loss(log: &str) -> Vec<f64> {
    log.lines().filter_map(|l| l.split("train loss ").nth(1)).map(|r| r.split(' ').next().unwrap().parse().unwrap()).collect()
}

/// One device per node: the master adds node 0's gradient and node 1's, as burn-collective adds
/// two devices' in one process, so the runs are the same bits.
#[test]
fn two_nodes_of_one_device_train_as_one_node_of_two() {
    let dir = scratch("one");
    run_two(&dir.join("two"), &dir.join("two-node1"), &["--epochs", "2", "--devices", "0"]);
    let log = log_of(&dir.join("two-node1"));
    assert!(log.contains("starting from the master's weights") && log.contains("(validated on node 0)"), "{log}");
    assert!(!dir.join("two-node1/model.bpk").exists() && !dir.join("two-node1/checkpoints").exists(), "node 1 wrote what only the master writes");
    let mut one = start(&dir.join("one"), &flags(&["--epochs", "2", "--devices", "0,1"]));
    assert_eq!(finish(&mut one, Duration::from_secs(600)), Some(0), "{}", log_of(&dir.join("one")));
    let (two, one) = (weights(&dir.join("two/model.bpk")), weights(&dir.join("one/model.bpk")));
    assert_eq!(two.len(), one.len());
    for (i, (a, b)) in two.iter().zip(&one).enumerate() {
        let differing = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differing, 0, "parameter {i}: {differing} of {} values differ between two nodes and one", a.len());
    }
    assert_eq!(train_loss(&log_of(&dir.join("two"))), train_loss(&log));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_nodes_of_two_devices_train_and_resume_exactly() {
    let dir = scratch("train");
    run_two(&dir.join("two"), &dir.join("two-node1"), &["--epochs", "2"]);
    // Both nodes logged the whole batch's training loss; one node of four devices logs the same
    // first epoch to float rounding (burn-collective adds four devices in the order of a hash
    // map, the nodes (0 + 1) + (2 + 3); batch norm over shards of 6 rows amplifies the
    // difference later).
    let mut one = start(&dir.join("one"), &flags(&["--epochs", "2", "--devices", "0,1,2,3"]));
    assert_eq!(finish(&mut one, Duration::from_secs(600)), Some(0), "{}", log_of(&dir.join("one")));
    let (l0, l1, l4) = (train_loss(&log_of(&dir.join("two"))), train_loss(&log_of(&dir.join("two-node1"))), train_loss(&log_of(&dir.join("one"))));
    assert_eq!(l0.len(), 2);
    assert_eq!(l0, l1, "the two nodes logged different losses");
    assert!((l0[0] - l4[0]).abs() < 1e-3, "{l0:?} against one node's {l4:?}");

    // Stopped after epoch 1 and resumed; node 1 resumes into a fresh folder (the master sends it
    // the checkpoint): bit for bit the uninterrupted run.
    run_two(&dir.join("resumed"), &dir.join("resumed-node1"), &["--epochs", "2", "--stop-after", "1"]);
    run_two(&dir.join("resumed"), &dir.join("resumed-node1-again"), &["--epochs", "2", "--resume"]);
    let log = log_of(&dir.join("resumed-node1-again"));
    assert!(log.contains("resuming from") && log.contains("epoch   2/2"), "{log}");
    assert_eq!(weights(&dir.join("resumed/model.bpk")), weights(&dir.join("two/model.bpk")), "the resumed two-node run ends elsewhere");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kills `victim` (0 or 1) once both nodes train; the survivor must stop with an error naming
/// it, long before the heartbeat timeout (its connection closes).
fn kill_one(victim: usize) {
    let dir = scratch(&format!("kill{victim}"));
    let port = free_port();
    let outs = [dir.join("node0"), dir.join("node1")];
    let mut children = [start(&outs[0], &node(0, port, &["--epochs", "1000"])), start(&outs[1], &node(1, port, &["--epochs", "1000"]))];
    let started = Instant::now();
    while !log_of(&outs[1]).contains("epoch   1/1000") {
        assert!(started.elapsed() < Duration::from_secs(300), "the run did not get going:\n{}\n{}", log_of(&outs[0]), log_of(&outs[1]));
        assert!(children.iter_mut().all(|c| c.try_wait().unwrap().is_none()), "a node ended early:\n{}\n{}", log_of(&outs[0]), log_of(&outs[1]));
        std::thread::sleep(Duration::from_millis(100));
    }
    children[victim].kill().unwrap();
    children[victim].wait().unwrap();
    let killed = Instant::now();
    let survivor = 1 - victim;
    let code = finish(&mut children[survivor], Duration::from_secs(25));
    let log = log_of(&outs[survivor]);
    assert_eq!(code, Some(1), "node {survivor} did not stop with an error within 25 s of the kill:\n{log}");
    let names = if victim == 0 { "the master (127.0.0.1" } else { "node 1 stopped the run" };
    assert!(log.contains(names) && log.contains("connection closed"), "node {survivor}'s error does not name node {victim}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("node {survivor} stopped {:.1} s after node {victim} was killed", killed.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_killed_node_stops_the_master_by_name() {
    kill_one(1);
}

#[test]
fn a_killed_master_stops_the_nodes_by_name() {
    kill_one(0);
}

/// An error on node 0 before the first step (here `--resume` with no checkpoint) reaches the
/// other node in words, not as a lost connection.
#[test]
fn the_masters_error_reaches_the_nodes() {
    let dir = scratch("refused");
    let port = free_port();
    let (master, other) = (dir.join("node0"), dir.join("node1"));
    let mut a = start(&master, &node(0, port, &["--epochs", "2", "--resume"]));
    let mut b = start(&other, &node(1, port, &["--epochs", "2", "--resume"]));
    let limit = Duration::from_secs(120);
    assert_eq!((finish(&mut a, limit), finish(&mut b, limit)), (Some(1), Some(1)));
    let log = log_of(&other);
    assert!(log.contains("the master stopped the run: --resume:") && log.contains("holds no checkpoint"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}
