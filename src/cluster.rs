//! Running as one process of many under a scheduler: which shard of the ids this process
//! takes (`--shard I/N`, or `--shard auto` from SLURM's or torchrun's environment) and which
//! GPU it uses. clipmask schedules nothing itself: the scheduler starts the processes, each
//! takes its shard, and `clipmask status` says whether the union is complete.
//!
//! An id belongs to shard `hash(id) mod N` (FNV-1a, 64 bit): shards are disjoint, cover every
//! id, and do not depend on the order of the input listing, so a requeued task takes exactly
//! the ids it had.
use anyhow::{bail, Context, Result};

/// One process's part of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// 0-based.
    pub index: usize,
    pub count: usize,
    /// Where the numbers came from ("--shard 1/4", "SLURM_ARRAY_TASK_ID=... ...").
    pub source: String,
}

/// The environment a process was started with (a map for tests, the real one otherwise).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Env for std::collections::HashMap<&str, &str, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| v.to_string())
    }
}

fn number(env: &dyn Env, name: &str) -> Result<Option<usize>> {
    env.var(name)
        .map(|v| v.trim().parse::<usize>().with_context(|| format!("{name}={v:?} is not a non-negative integer")))
        .transpose()
}

impl Shard {
    /// The whole run.
    pub fn all() -> Shard {
        Shard { index: 0, count: 1, source: "no shard".into() }
    }

    /// `I/N` (0 <= I < N), or `auto`: [`Shard::from_env`].
    pub fn parse(spec: &str, env: &dyn Env) -> Result<Shard> {
        if spec.trim() == "auto" {
            return Shard::from_env(env);
        }
        let (i, n) =
            spec.split_once('/').with_context(|| format!("shard {spec:?}: expected I/N (e.g. 0/4) or auto"))?;
        let (index, count): (usize, usize) = (
            i.trim().parse().with_context(|| format!("shard {spec:?}: I is not a number"))?,
            n.trim().parse().with_context(|| format!("shard {spec:?}: N is not a number"))?,
        );
        if count == 0 || index >= count {
            bail!("shard {spec:?}: need 0 <= I < N");
        }
        Ok(Shard { index, count, source: format!("shard {index}/{count}") })
    }

    /// The shard a scheduler gave this process:
    /// - a SLURM job array: `SLURM_ARRAY_TASK_ID` of `SLURM_ARRAY_TASK_COUNT` tasks, or of
    ///   `SLURM_ARRAY_TASK_MIN..=SLURM_ARRAY_TASK_MAX` (arrays that do not start at 0);
    /// - srun tasks: `SLURM_PROCID` of `SLURM_NTASKS`; inside an array task the array's shard
    ///   is split again over its tasks (shard = array index x tasks + task);
    /// - else torchrun: `RANK` of `WORLD_SIZE`;
    /// - else the whole run.
    pub fn from_env(env: &dyn Env) -> Result<Shard> {
        let mut parts: Vec<(usize, usize, String)> = Vec::new();
        if let Some(id) = number(env, "SLURM_ARRAY_TASK_ID")? {
            let min = number(env, "SLURM_ARRAY_TASK_MIN")?;
            let max = number(env, "SLURM_ARRAY_TASK_MAX")?;
            let count = number(env, "SLURM_ARRAY_TASK_COUNT")?;
            let (index, n, vars) = match (min, max, count) {
                (Some(min), Some(max), _) if max >= min => {
                    (id.checked_sub(min), max - min + 1, format!("SLURM_ARRAY_TASK_ID={id} MIN={min} MAX={max}"))
                }
                (min, _, Some(count)) => {
                    let min = min.unwrap_or(0);
                    (id.checked_sub(min), count, format!("SLURM_ARRAY_TASK_ID={id} COUNT={count}"))
                }
                _ => bail!(
                    "SLURM_ARRAY_TASK_ID={id} without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MIN/MAX: cannot tell \
                     the array's size"
                ),
            };
            match index {
                Some(i) if i < n => parts.push((i, n, vars)),
                _ => bail!("{vars}: the task id is outside the array"),
            }
        }
        // Task ids count only inside an srun step (SLURM_STEP_ID set): the batch script of an
        // allocation of several tasks has SLURM_PROCID=0 and SLURM_NTASKS=N too, and a run
        // started there directly must not take a 1/N share.
        let in_step = env.var("SLURM_STEP_ID").or_else(|| env.var("SLURM_STEPID")).is_some();
        let slurm_task = match (number(env, "SLURM_PROCID")?, number(env, "SLURM_NTASKS")?) {
            (Some(p), Some(n)) if in_step && p < n && n > 1 => {
                Some((p, n, format!("SLURM_PROCID={p} SLURM_NTASKS={n}")))
            }
            (Some(p), Some(n)) if in_step && p >= n => bail!("SLURM_PROCID={p} is not below SLURM_NTASKS={n}"),
            _ => None,
        };
        if let Some(t) = slurm_task {
            parts.push(t);
        } else if parts.is_empty() {
            match (number(env, "RANK")?, number(env, "WORLD_SIZE")?) {
                (Some(r), Some(w)) if r < w => parts.push((r, w, format!("RANK={r} WORLD_SIZE={w}"))),
                (Some(r), Some(w)) => bail!("RANK={r} is not below WORLD_SIZE={w}"),
                _ => {}
            }
        }
        if parts.is_empty() {
            return Ok(Shard { index: 0, count: 1, source: "--shard auto: no SLURM or torchrun variables".into() });
        }
        // Mixed radix: the outer level (array) times the inner (tasks).
        let (mut index, mut count) = (0usize, 1usize);
        for (i, n, _) in &parts {
            index = index * n + i;
            count *= n;
        }
        let source = parts.iter().map(|(_, _, v)| v.as_str()).collect::<Vec<_>>().join(", ");
        Ok(Shard { index, count, source })
    }

    /// Whether `id` belongs to this shard.
    pub fn contains(&self, id: &str) -> bool {
        self.count <= 1 || shard_of(id, self.count) == self.index
    }

    /// Whether the run is split at all.
    pub fn is_split(&self) -> bool {
        self.count > 1
    }

    /// The part of file names that is this shard's: `"2-of-8"` (used for failures.2-of-8.jsonl).
    pub fn tag(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// `stem.ext` for the whole run, `stem.<i>-of-<n>.ext` for a shard: files shards never share.
    pub fn file_name(&self, stem: &str, ext: &str) -> String {
        if self.is_split() {
            format!("{stem}.{}.{ext}", self.tag())
        } else {
            format!("{stem}.{ext}")
        }
    }
}

/// The shard of `count` that `id` belongs to: FNV-1a (64 bit) of its bytes, mod `count`.
pub fn shard_of(id: &str, count: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % count.max(1) as u64) as usize
}

/// The device `--device auto` means for this process: with a local rank (`SLURM_LOCALID`, else
/// torchrun's `LOCAL_RANK`) and several visible GPUs, GPU `rank mod visible`, so that each
/// process of a node takes its own; else the first GPU; else the CPU. Returns the device text
/// (for `device::parse_device`) and where it came from.
pub fn auto_device(env: &dyn Env, visible_gpus: usize) -> (String, String) {
    if visible_gpus == 0 {
        return ("cpu".into(), "no GPU visible".into());
    }
    let rank = ["SLURM_LOCALID", "LOCAL_RANK"].iter().find_map(|v| env.var(v).map(|x| (v, x)));
    let visible =
        env.var("CUDA_VISIBLE_DEVICES").map(|v| format!(" within CUDA_VISIBLE_DEVICES={v}")).unwrap_or_default();
    match rank.and_then(|(v, x)| x.trim().parse::<usize>().ok().map(|r| (v, r))) {
        Some((var, r)) => {
            let gpu = r % visible_gpus;
            (format!("cuda:{gpu}"), format!("{var}={r} of {visible_gpus} visible GPU(s){visible}"))
        }
        None => ("cuda:0".into(), format!("no local rank; {visible_gpus} visible GPU(s){visible}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().cloned().collect()
    }

    #[test]
    fn shards_are_disjoint_cover_every_id_and_ignore_the_order() {
        let ids: Vec<String> = (0..1000).map(|k| format!("2007_{k:06}")).collect();
        for n in [1, 2, 3, 8] {
            let mut seen = vec![0; ids.len()];
            for i in 0..n {
                let s = Shard { index: i, count: n, source: String::new() };
                for (k, id) in ids.iter().enumerate() {
                    if s.contains(id) {
                        seen[k] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n = {n}: every id in exactly one shard");
        }
        // Balanced within 20 % for 8 shards of 1000 ids.
        let sizes: Vec<usize> = (0..8).map(|i| ids.iter().filter(|id| shard_of(id, 8) == i).count()).collect();
        assert!(sizes.iter().all(|&s| (100..=150).contains(&s)), "{sizes:?}");
        // FNV-1a of "a" is 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(shard_of("a", usize::MAX), (0xaf63dc4c8601ec8c_u64 % usize::MAX as u64) as usize);
    }

    #[test]
    fn explicit_shards_parse_and_bad_ones_are_errors() {
        let e = env(&[]);
        assert_eq!(Shard::parse("1/4", &e).unwrap(), Shard { index: 1, count: 4, source: "shard 1/4".into() });
        for bad in ["4/4", "1/0", "x/2", "1", "-1/2"] {
            assert!(Shard::parse(bad, &e).is_err(), "{bad}");
        }
    }

    /// Variables, and the expected (shard, count) or None for an error.
    type Case = (Vec<(&'static str, &'static str)>, Option<(usize, usize)>);

    #[test]
    fn auto_reads_every_scheduler_variable_combination() {
        let cases: Vec<Case> = vec![
            (vec![], Some((0, 1))),
            // An array starting at 0, given by its count.
            (vec![("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "8")], Some((3, 8))),
            // An array 5-12: its MIN/MAX, not the raw id.
            (
                vec![("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_MIN", "5"), ("SLURM_ARRAY_TASK_MAX", "12")],
                Some((2, 8)),
            ),
            // MIN with COUNT (no MAX).
            (
                vec![("SLURM_ARRAY_TASK_ID", "11"), ("SLURM_ARRAY_TASK_MIN", "10"), ("SLURM_ARRAY_TASK_COUNT", "4")],
                Some((1, 4)),
            ),
            // srun tasks.
            (vec![("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4"), ("SLURM_STEP_ID", "0")], Some((2, 4))),
            // The batch script of a 4-task allocation (no step): the whole run, not 1/4.
            (vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")], Some((0, 1))),
            // One srun task is no split.
            (vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_STEP_ID", "0")], Some((0, 1))),
            // Array x srun: array task 1 of 3, task 1 of 2 -> shard 3 of 6.
            (
                vec![
                    ("SLURM_ARRAY_TASK_ID", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_STEPID", "0"),
                ],
                Some((3, 6)),
            ),
            // A nonzero-minimum array split over tasks: (9 - 8) x 2 + 0.
            (
                vec![
                    ("SLURM_ARRAY_TASK_ID", "9"),
                    ("SLURM_ARRAY_TASK_MIN", "8"),
                    ("SLURM_ARRAY_TASK_MAX", "10"),
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_STEP_ID", "1"),
                ],
                Some((2, 6)),
            ),
            // torchrun.
            (vec![("RANK", "5"), ("WORLD_SIZE", "8")], Some((5, 8))),
            // SLURM wins over torchrun variables in the same environment.
            (
                vec![
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_STEP_ID", "0"),
                    ("RANK", "5"),
                    ("WORLD_SIZE", "8"),
                ],
                Some((1, 2)),
            ),
            // Inconsistent values are errors, not silent whole runs.
            (vec![("SLURM_ARRAY_TASK_ID", "3")], None),
            (vec![("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_MIN", "5"), ("SLURM_ARRAY_TASK_MAX", "9")], None),
            (vec![("SLURM_ARRAY_TASK_ID", "8"), ("SLURM_ARRAY_TASK_COUNT", "8")], None),
            (vec![("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4"), ("SLURM_STEP_ID", "0")], None),
            (vec![("RANK", "8"), ("WORLD_SIZE", "8")], None),
            (vec![("RANK", "x"), ("WORLD_SIZE", "8")], None),
        ];
        for (vars, want) in cases {
            let got = Shard::parse("auto", &env(&vars));
            match want {
                Some((i, n)) => {
                    let s = got.unwrap_or_else(|e| panic!("{vars:?}: {e:#}"));
                    assert_eq!((s.index, s.count), (i, n), "{vars:?} ({})", s.source);
                }
                None => assert!(got.is_err(), "{vars:?} should be an error, got {got:?}"),
            }
        }
    }

    #[test]
    fn the_local_rank_picks_the_gpu() {
        let e = env(&[("SLURM_LOCALID", "3"), ("CUDA_VISIBLE_DEVICES", "0,1,2,3")]);
        assert_eq!(auto_device(&e, 4).0, "cuda:3");
        // SLURM bound one GPU per task: the task sees only its own, as cuda:0.
        let e = env(&[("SLURM_LOCALID", "3"), ("CUDA_VISIBLE_DEVICES", "3")]);
        assert_eq!(auto_device(&e, 1).0, "cuda:0");
        let e = env(&[("LOCAL_RANK", "5")]);
        assert_eq!(auto_device(&e, 4).0, "cuda:1");
        assert_eq!(auto_device(&env(&[]), 2).0, "cuda:0");
        assert_eq!(auto_device(&env(&[("LOCAL_RANK", "1")]), 0).0, "cpu");
    }
}
