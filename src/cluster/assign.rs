//! Which live replica runs which enrollment: rendezvous hashing with bounded loads. Every
//! replica computes the same answer from the same lists (live replicas, enrollment ids), with
//! no coordination; the leases settle the moments when two replicas' lists differ.
//!
//! Each enrollment goes to the replica that scores highest for it, unless that replica
//! already has its share (`max(ceil(n / k), floor(1.05 × n / k))`): then to the next. Plain rendezvous spreads
//! 200 enrollments over 3 replicas only within about ±20 % (two standard deviations); the
//! bound keeps every replica at most 5 % above the mean (so, with 3 replicas, at most about
//! 10 % below it), and moves few enrollments when a replica joins or leaves.

use std::collections::HashMap;

use uuid::Uuid;

/// How far above the mean share a replica may go, in percent.
const SLACK_PERCENT: usize = 5;

/// 64-bit FNV-1a, then SplitMix64's finaliser: stable across processes and versions.
fn score(replica: &str, id: &Uuid) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in replica
        .bytes()
        .chain([0])
        .chain(id.as_bytes().iter().copied())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The replica (an index into `replicas`) each enrollment goes to; empty without replicas.
pub fn assign(enrollments: &[Uuid], replicas: &[String]) -> HashMap<Uuid, usize> {
    let mut out = HashMap::with_capacity(enrollments.len());
    if replicas.is_empty() {
        return out;
    }
    let mut ids = enrollments.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let k = replicas.len();
    let n = ids.len();
    // cap × k ≥ n; the slack only where it adds a whole enrollment (2 over 2 go 1 and 1).
    let cap = n.div_ceil(k).max(n * (100 + SLACK_PERCENT) / (100 * k));
    let mut load = vec![0usize; k];
    let mut ranked: Vec<(u64, usize)> = Vec::with_capacity(k);
    for id in ids {
        ranked.clear();
        ranked.extend(replicas.iter().enumerate().map(|(i, r)| (score(r, &id), i)));
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        // Some replica always has room, since cap × k ≥ n.
        if let Some(&(_, chosen)) = ranked.iter().find(|(_, i)| load[*i] < cap) {
            load[chosen] += 1;
            out.insert(id, chosen);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("replica-{i:08x}")).collect()
    }

    fn counts(a: &HashMap<Uuid, usize>, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for i in a.values() {
            c[*i] += 1;
        }
        c
    }

    #[test]
    fn every_enrollment_gets_one_replica_and_the_spread_is_even() {
        for (n, k) in [
            (200, 3),
            (1000, 3),
            (7, 2),
            (2, 2),
            (1, 3),
            (200, 2),
            (50, 5),
        ] {
            let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
            let a = assign(&ids, &replicas(k));
            assert_eq!(a.len(), n);
            let mean = n as f64 / k as f64;
            let cap = n.div_ceil(k).max(n * 105 / (100 * k));
            for c in counts(&a, k) {
                assert!(c <= cap, "{n} over {k}: {:?}", counts(&a, k));
                if n >= 50 && k <= 3 {
                    assert!(
                        (c as f64 - mean).abs() <= mean * 0.2,
                        "{n} over {k}: {:?}",
                        counts(&a, k)
                    );
                }
            }
        }
        assert!(assign(&[Uuid::new_v4()], &[]).is_empty());
    }

    #[test]
    fn every_replica_computes_the_same_answer_and_few_move_on_a_join() {
        let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
        let two = replicas(2);
        let mut reversed = ids.clone();
        reversed.reverse();
        assert_eq!(assign(&ids, &two), assign(&reversed, &two));
        let three = replicas(3);
        let before = assign(&ids, &two);
        let after = assign(&ids, &three);
        let moved = ids
            .iter()
            .filter(|id| three[after[id]] != two[before[id]])
            .count();
        // A third of them must move to the newcomer; the bound adds a few more.
        assert!(moved < 300 / 3 + 300 / 6, "{moved} moved");
    }
}
