//! The one ordered pipeline every command moves blocks through: a producer thread (the source
//! reader of a backup, the repository reader of a restore), `workers` stage threads (zero test,
//! hash and compress; or decompress and check), and a consumer on the caller's thread that gets
//! the results strictly in sequence order (the segment writer; the target writer).
//!
//! Memory is bounded by the channels' capacity plus whatever pool of buffers the caller
//! circulates; the pipeline itself holds at most `capacity` items in each channel and in its
//! reorder window.
//!
//! Failures: a stage error is delivered in order, so everything before the failed item is
//! consumed and nothing from it on. When the consumer fails, every channel is closed so the
//! producer and the stages stop at their next send, and the consumer's error is returned. When
//! the input ends early, the producer's error explains it and is returned.

use anyhow::{anyhow, Result};
use crossbeam_channel::{bounded, Receiver, TryRecvError};
use std::collections::BTreeMap;

/// An item's position in the stream: 0, 1, 2, … with no gaps.
pub trait Sequenced {
    fn seq(&self) -> u64;
}

/// The in-order end of a pipeline.
pub trait Consumer<O> {
    /// Takes the next item, in sequence order.
    fn take(&mut self, item: O) -> Result<()>;

    /// Called when the next item is not ready yet. Returns true when it did some work (reaped an
    /// I/O completion, say), so the pipeline polls again instead of blocking.
    fn idle(&mut self) -> Result<bool> {
        Ok(false)
    }
}

/// Runs `produce` on its own thread, `workers` threads each running a stage made by
/// `make_stage`, and `consumer` on this thread. Returns the producer's result.
pub fn run<I, O, R, S>(
    workers: usize,
    capacity: usize,
    produce: impl FnOnce(crossbeam_channel::Sender<I>) -> Result<R> + Send,
    make_stage: impl Fn() -> Result<S> + Sync,
    consumer: &mut impl Consumer<O>,
) -> Result<R>
where
    I: Sequenced + Send,
    O: Send,
    R: Send,
    S: FnMut(I) -> Result<O>,
{
    let (in_tx, in_rx) = bounded::<I>(capacity);
    let (out_tx, out_rx) = bounded::<(u64, Result<O>)>(capacity);
    std::thread::scope(|s| {
        let producer = s.spawn(move || produce(in_tx));
        let mut stages = Vec::new();
        for _ in 0..workers.max(1) {
            let (rx, tx) = (in_rx.clone(), out_tx.clone());
            let make_stage = &make_stage;
            stages.push(s.spawn(move || -> Result<()> {
                let mut stage = make_stage()?;
                for item in rx {
                    let seq = item.seq();
                    let failed = {
                        let r = stage(item);
                        let failed = r.is_err();
                        if tx.send((seq, r)).is_err() {
                            break;
                        }
                        failed
                    };
                    if failed {
                        // Items after a failed one are never consumed: stop working on them.
                        break;
                    }
                }
                Ok(())
            }));
        }
        drop((in_rx, out_tx));
        let consumed = consume_in_order(&out_rx, consumer);
        // Unblock everything upstream before joining, whatever happened.
        drop(out_rx);
        let produced = producer
            .join()
            .map_err(|_| anyhow!("pipeline producer thread panicked"))?;
        for st in stages {
            st.join()
                .map_err(|_| anyhow!("pipeline stage thread panicked"))??;
        }
        match consumed {
            Ok(()) => produced,
            Err(Stop::Failed(e)) => Err(e),
            Err(Stop::InputEnded { missing }) => match produced {
                Err(e) => Err(e),
                Ok(_) => Err(anyhow!(
                    "the pipeline lost item {missing} (a stage stopped early)"
                )),
            },
        }
    })
}

enum Stop {
    Failed(anyhow::Error),
    /// The input closed while items from `missing` on were still awaited.
    InputEnded {
        missing: u64,
    },
}

fn consume_in_order<O>(
    rx: &Receiver<(u64, Result<O>)>,
    consumer: &mut impl Consumer<O>,
) -> std::result::Result<(), Stop> {
    let mut pending: BTreeMap<u64, Result<O>> = BTreeMap::new();
    let mut next = 0u64;
    let mut closed = false;
    loop {
        if let Some(r) = pending.remove(&next) {
            next += 1;
            consumer
                .take(r.map_err(Stop::Failed)?)
                .map_err(Stop::Failed)?;
            continue;
        }
        if closed {
            return match pending.is_empty() {
                true => Ok(()),
                false => Err(Stop::InputEnded { missing: next }),
            };
        }
        let got = match rx.try_recv() {
            Ok(x) => Some(x),
            Err(TryRecvError::Disconnected) => None,
            Err(TryRecvError::Empty) => {
                if consumer.idle().map_err(Stop::Failed)? {
                    continue;
                }
                rx.recv().ok()
            }
        };
        match got {
            Some((seq, r)) => {
                pending.insert(seq, r);
            }
            None => closed = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(u64);
    impl Sequenced for Item {
        fn seq(&self) -> u64 {
            self.0
        }
    }

    struct Collect(Vec<u64>);
    impl Consumer<u64> for Collect {
        fn take(&mut self, item: u64) -> Result<()> {
            self.0.push(item);
            if item == 1000 {
                anyhow::bail!("consumer refused 1000");
            }
            Ok(())
        }
    }

    fn produce_n(n: u64) -> impl FnOnce(crossbeam_channel::Sender<Item>) -> Result<u64> + Send {
        move |tx| {
            for i in 0..n {
                if tx.send(Item(i)).is_err() {
                    return Ok(i);
                }
            }
            Ok(n)
        }
    }

    #[test]
    fn items_arrive_in_order_whatever_the_stages_do() {
        let mut c = Collect(Vec::new());
        let stage = || {
            Ok(|i: Item| {
                // Uneven work, so workers finish out of order.
                if i.0 % 7 == 0 {
                    std::thread::yield_now();
                }
                Ok(i.0 * 2)
            })
        };
        let n = run(3, 4, produce_n(500), stage, &mut c).unwrap();
        assert_eq!(n, 500);
        assert_eq!(c.0, (0..500).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_stage_error_stops_in_order_after_everything_before_it() {
        let mut c = Collect(Vec::new());
        let stage = || {
            Ok(|i: Item| match i.0 {
                37 => Err(anyhow!("item 37 is damaged")),
                n => Ok(n),
            })
        };
        let e = run(2, 4, produce_n(100), stage, &mut c).unwrap_err();
        assert!(format!("{e}").contains("37"), "{e}");
        assert_eq!(c.0, (0..37).collect::<Vec<_>>());
    }

    #[test]
    fn a_consumer_error_stops_the_producer_and_is_returned() {
        let mut c = Collect(Vec::new());
        let stage = || Ok(|i: Item| Ok(i.0));
        let e = run(2, 4, produce_n(1_000_000), stage, &mut c).unwrap_err();
        assert!(format!("{e}").contains("refused 1000"), "{e}");
        assert_eq!(c.0.len(), 1001);
    }

    #[test]
    fn a_producer_error_explains_the_early_end() {
        let mut c = Collect(Vec::new());
        let stage = || Ok(|i: Item| Ok(i.0));
        let produce = |tx: crossbeam_channel::Sender<Item>| -> Result<()> {
            for i in 0..10 {
                let _ = tx.send(Item(i));
            }
            anyhow::bail!("source went away at item 10")
        };
        let e = run(2, 4, produce, stage, &mut c).unwrap_err();
        assert!(format!("{e}").contains("went away"), "{e}");
        assert_eq!(c.0, (0..10).collect::<Vec<_>>());
    }
}
