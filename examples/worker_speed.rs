//! The app's worker against a direct call, in one process, with no window (release build,
//! quiet machine; set `RAYON_NUM_THREADS` as the binary's `main` does):
//!
//!     cargo run --release --example worker_speed [runs] [idle-ms] [zipar-first | compare]
//!
//! Runs NTP and ZipAR-8 on the built-in model through the worker thread the app uses (events
//! drained here, as the UI would) and through `decode::generate` on this thread, alternated,
//! each after `idle-ms` of idle (as between a user's clicks), and prints each side's median
//! decode time (the sum of the passes' times). `compare` runs the app's Compare instead: NTP
//! then ZipAR-8 through the worker after each idle. What differs from the app is the
//! rendering: measured here, the worker's thread and events cost nothing (NTP 90.9 vs 91.6
//! ms), and 3 s of idle before a run about 10 ms.

use std::time::Duration;

use zipar_studio::decode::{Flow, GenerateParams, Mode, generate};
use zipar_studio::model::Condition;
use zipar_studio::worker::{Command, Event, ModelSource, WorkerHandle};

/// The allocator of the app's binary (see main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    // milliseconds of idle before each run, as between a user's clicks
    let idle: Option<u64> = std::env::args().nth(2).and_then(|a| a.parse().ok());
    let worker = WorkerHandle::spawn(|| {});
    worker.send(Command::LoadModel {
        job: 1,
        source: ModelSource::Builtin,
        device: "cpu".into(),
    });
    let mut loaded = zipar_studio::model::registry::open(
        &zipar_studio::default_model_dir(),
        &candle_core::Device::Cpu,
    )?;
    let cond = Condition::Class(0);
    if std::env::args().nth(3).as_deref() == Some("compare") {
        // The app's Compare: NTP then ZipAR-8 through the worker, after `idle` ms.
        let mut times = [Vec::new(), Vec::new()];
        let mut job = 1;
        for i in 0..runs + 1 {
            std::thread::sleep(Duration::from_millis(idle.unwrap_or(0)));
            for (k, mode) in [Mode::Ntp, Mode::Zipar].into_iter().enumerate() {
                job += 1;
                worker.send(Command::Generate {
                    job,
                    cond: cond.clone(),
                    params: GenerateParams {
                        mode,
                        window: 8,
                        cfg_scale: 2.0,
                        seed: i as u64,
                        ..GenerateParams::default()
                    },
                    attention: None,
                });
                loop {
                    match worker.events.recv_timeout(Duration::from_secs(60))? {
                        Event::Finished { trace, .. } => {
                            times[k].push(trace.pass_ms.iter().sum::<f64>());
                            break;
                        }
                        Event::Failed { error, .. } => anyhow::bail!("{error}"),
                        _ => {}
                    }
                }
            }
        }
        println!(
            "compare: ntp {:.1} ms, zipar {:.1} ms",
            median(times[0][1..].to_vec()),
            median(times[1][1..].to_vec())
        );
        return Ok(());
    }
    let mut job = 1;
    let order = if std::env::args().nth(3).as_deref() == Some("zipar-first") {
        [Mode::Zipar, Mode::Ntp]
    } else {
        [Mode::Ntp, Mode::Zipar]
    };
    for mode in order {
        let params = GenerateParams {
            mode,
            window: 8,
            cfg_scale: 2.0,
            ..GenerateParams::default()
        };
        let (mut via_worker, mut direct) = (Vec::new(), Vec::new());
        for i in 0..runs + 1 {
            if let Some(ms) = idle {
                std::thread::sleep(Duration::from_millis(ms));
            }
            job += 1;
            worker.send(Command::Generate {
                job,
                cond: cond.clone(),
                params: GenerateParams {
                    seed: i as u64,
                    ..params
                },
                attention: None,
            });
            loop {
                match worker.events.recv_timeout(Duration::from_secs(60))? {
                    Event::Finished { trace, .. } => {
                        via_worker.push(trace.pass_ms.iter().sum::<f64>());
                        break;
                    }
                    Event::Failed { error, .. } => anyhow::bail!("{error}"),
                    _ => {}
                }
            }
            if let Some(ms) = idle {
                std::thread::sleep(Duration::from_millis(ms));
            }
            let p = GenerateParams {
                seed: i as u64,
                ..params
            };
            let trace = generate(loaded.model.as_mut(), &cond, &p, &mut |_| Flow::Continue)?;
            direct.push(trace.pass_ms.iter().sum::<f64>());
        }
        // the first of each is a warm-up
        println!(
            "{mode:?}: worker {:.1} ms, direct {:.1} ms (median of {runs})",
            median(via_worker[1..].to_vec()),
            median(direct[1..].to_vec())
        );
    }
    Ok(())
}
