//! The all-reduce of a data-parallel step: the gradients of the paper's models as one flat bucket
//! of f32, summed over 2 and 4 peers of this process on burn-collective (what `--devices` does
//! every step, besides the forward and backward), and between two processes over TCP on this
//! machine (what `--nodes 2` does: the bench starts itself again as node 1).

use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use pf_models::ModelName;
use pf_train::nodes::{NodeGroup, NodeSpec};
use pf_train::parallel::time_all_reduce;

/// Set in the second process: `PORT LEN ROUNDS`.
const NODE_ONE: &str = "PF_BENCH_NODE_ONE";

fn spec(rank: usize, port: u16) -> NodeSpec {
    NodeSpec { nodes: 2, rank, master: format!("127.0.0.1:{port}"), timeout: Duration::from_secs(120) }
}

/// `rounds` sums of `len` values between this process (node 0) and a second one.
fn time_between_processes(len: usize, rounds: usize) -> Duration {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut other = Command::new(std::env::current_exe().unwrap()).env(NODE_ONE, format!("{port} {len} {rounds}")).spawn().expect("node 1 starts");
    let mut group = NodeGroup::connect(spec(0, port), &len).expect("node 1 joins");
    let bucket = vec![1.0f32; len];
    let started = Instant::now();
    for _ in 0..rounds {
        let sum = group.sum(bucket.clone()).expect("the sum");
        assert_eq!(sum[0], 2.0);
    }
    let elapsed = started.elapsed();
    assert!(other.wait().unwrap().success());
    elapsed
}

fn node_one(args: &str) {
    let [port, len, rounds]: [usize; 3] = args.split(' ').map(|a| a.parse().unwrap()).collect::<Vec<_>>().try_into().unwrap();
    let mut group = NodeGroup::connect(spec(1, port as u16), &len).expect("joining node 0");
    let bucket = vec![1.0f32; len];
    for _ in 0..rounds {
        group.sum(bucket.clone()).expect("the sum");
    }
}

fn all_reduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("all-reduce");
    group.sample_size(10);
    for name in [ModelName::Resnet50Hybrid, ModelName::VitSMax] {
        let params = name.info().expect("preset").params;
        group.throughput(Throughput::Bytes(4 * params as u64));
        for peers in [2, 4] {
            group.bench_function(format!("{name}/{peers}-peers"), |b| {
                b.iter_custom(|rounds| time_all_reduce(params, peers, rounds as usize).expect("all-reduce"))
            });
        }
        group.bench_function(format!("{name}/2-processes"), |b| b.iter_custom(|rounds| time_between_processes(params, rounds as usize)));
    }
    group.finish();
}

criterion_group!(benches, all_reduce);

fn main() {
    if let Ok(args) = std::env::var(NODE_ONE) {
        node_one(&args);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
