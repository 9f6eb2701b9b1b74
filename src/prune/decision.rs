//! The prune decision: a pure function from restore points and keep rules to a keep or remove
//! mark per point (as restic's `forget` and proxmox-backup's `pbs-datastore/src/prune.rs` keep
//! the decision apart from the doing). It reads no files and no clock: the points carry their
//! times, and `--keep-within` counts back from the newest point's time, not from now, so a
//! repository that was not backed up for a month is not emptied by it.
//!
//! The rules are a union: a point is kept when any rule keeps it. The newest point of each name is
//! always kept, and so is every protected point. Protected points use up no rule's count (as in
//! proxmox-backup), so protecting an old point does not make a rule keep fewer recent ones.
//! Calendar buckets are UTC: hour, day, ISO week (Monday to Sunday, also across a year's end) and
//! month of `created_unix`. Which point is newer comes from the repository's order (the images'
//! sequence), never from the times.

use crate::format::ImageKind;
use serde::Serialize;
use std::collections::HashMap;

/// One restore point, as the decision sees it. Points come in the repository's order, oldest first.
#[derive(Debug, Clone)]
pub struct Point {
    pub id: String,
    pub name: String,
    pub created_unix: u64,
    pub kind: ImageKind,
    pub parent: Option<String>,
    pub protected: bool,
}

/// The keep rules of `cairn prune`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rules {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    /// Seconds back from the newest point of the name.
    pub within: Option<u64>,
    /// Bytes the repository may hold.
    pub max_size: Option<u64>,
}

impl Rules {
    fn any_keep_rule(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
        ]
        .iter()
        .any(Option::is_some)
            || self.within.is_some()
    }
}

/// Why a point is kept, or that it is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mark {
    pub id: String,
    pub keep: bool,
    /// The rules that keep it (`newest`, `protected`, `last`, `hourly`, `daily`, `weekly`,
    /// `monthly`, `within`, `max-size` when only a size was given), or why it goes (`max-size`
    /// when the size rule removed a point other rules kept; empty when no rule kept it).
    pub reasons: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecisionError {
    #[error("no keep rule given: prune refuses to decide without one (--keep-last N, --keep-daily N, --keep-within 30d, --max-size 500G, ...)")]
    NoRule,
}

/// Decides every point. `fits(marks)` says whether the repository fits `--max-size` once the
/// points marked remove are gone (the caller measures; only asked when `max_size` is set): while
/// it does not, the oldest point still kept that is neither protected nor the newest of its name
/// is marked remove too. Returns the marks in the order of `points`, and whether it fits.
pub fn decide(
    points: &[Point],
    rules: &Rules,
    mut fits: impl FnMut(&[Mark]) -> bool,
) -> Result<(Vec<Mark>, bool), DecisionError> {
    if !rules.any_keep_rule() && rules.max_size.is_none() {
        return Err(DecisionError::NoRule);
    }
    let mut marks: Vec<Mark> = points
        .iter()
        .map(|p| Mark {
            id: p.id.clone(),
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in points.iter().enumerate() {
        by_name.entry(p.name.as_str()).or_default().push(i);
    }
    for positions in by_name.values() {
        keep_by_rules(points, positions, rules, &mut marks);
    }
    let mut fit = true;
    if rules.max_size.is_some() {
        let newest: Vec<usize> = by_name.values().filter_map(|v| v.last().copied()).collect();
        loop {
            if fits(&marks) {
                break;
            }
            let candidate = (0..points.len())
                .find(|&i| marks[i].keep && !points[i].protected && !newest.contains(&i));
            let Some(i) = candidate else {
                fit = false;
                break;
            };
            marks[i].keep = false;
            marks[i].reasons = vec!["max-size"];
        }
    }
    Ok((marks, fit))
}

/// A calendar rule: its name, its count, and the bucket of a time.
type CalendarRule = (&'static str, Option<u32>, fn(u64) -> u64);

/// The keep rules for the points of one name (`positions`, oldest first).
fn keep_by_rules(points: &[Point], positions: &[usize], rules: &Rules, marks: &mut [Mark]) {
    let newest_time = positions
        .iter()
        .map(|&i| points[i].created_unix)
        .max()
        .unwrap_or(0);
    let calendar: [CalendarRule; 4] = [
        ("hourly", rules.hourly, |t| t / 3600),
        ("daily", rules.daily, |t| t / 86_400),
        ("weekly", rules.weekly, iso_week),
        ("monthly", rules.monthly, month),
    ];
    let mut left: Vec<u32> = calendar.iter().map(|c| c.1.unwrap_or(0)).collect();
    let mut last_bucket: Vec<Option<u64>> = vec![None; calendar.len()];
    let mut last_left = rules.last.unwrap_or(0);
    let only_size = !rules.any_keep_rule();
    for (rank, &i) in positions.iter().rev().enumerate() {
        let p = &points[i];
        let reasons = &mut marks[i].reasons;
        if rank == 0 {
            reasons.push("newest");
        }
        if p.protected {
            reasons.push("protected");
        } else {
            if last_left > 0 {
                last_left -= 1;
                reasons.push("last");
            }
            for (k, (what, _, bucket_of)) in calendar.iter().enumerate() {
                let bucket = bucket_of(p.created_unix);
                if left[k] > 0 && last_bucket[k] != Some(bucket) {
                    left[k] -= 1;
                    last_bucket[k] = Some(bucket);
                    reasons.push(what);
                }
            }
            if rules
                .within
                .is_some_and(|w| p.created_unix.saturating_add(w) >= newest_time)
            {
                reasons.push("within");
            }
            if only_size {
                reasons.push("max-size");
            }
        }
        marks[i].keep = !reasons.is_empty();
    }
}

/// The ISO week of a time: weeks run Monday to Sunday, so the bucket is the number of the
/// Monday starting it (1970-01-01 was a Thursday), which needs no week-year arithmetic at a
/// year's end.
fn iso_week(t: u64) -> u64 {
    (t / 86_400 + 3) / 7
}

/// The month of a time, as year × 12 + month (UTC, proleptic Gregorian).
fn month(t: u64) -> u64 {
    let (y, m, _) = civil_from_days((t / 86_400) as i64);
    (y as u64) * 12 + u64::from(m)
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31): Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-01T00:00:00Z, a Monday.
    const JAN1_2024: u64 = 1_704_067_200;
    const H: u64 = 3600;
    const D: u64 = 86_400;

    fn point(i: usize, t: u64) -> Point {
        Point {
            id: format!("p{i:02}"),
            name: "disk".into(),
            created_unix: t,
            kind: if i == 0 {
                ImageKind::Full
            } else {
                ImageKind::Incremental
            },
            parent: (i > 0).then(|| format!("p{:02}", i - 1)),
            protected: false,
        }
    }

    fn chain(times: &[u64]) -> Vec<Point> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| point(i, t))
            .collect()
    }

    fn kept(points: &[Point], rules: &Rules) -> Vec<String> {
        let (marks, fit) = decide(points, rules, |_| true).unwrap();
        assert!(fit);
        marks.into_iter().filter(|m| m.keep).map(|m| m.id).collect()
    }

    #[test]
    fn no_rule_is_refused() {
        let pts = chain(&[JAN1_2024]);
        assert_eq!(
            decide(&pts, &Rules::default(), |_| true).unwrap_err(),
            DecisionError::NoRule
        );
    }

    #[test]
    fn keep_last_keeps_the_newest_by_order_not_by_time() {
        // The clock went backwards for the last two: order still decides which are newest.
        let pts = chain(&[
            JAN1_2024 + 5 * D,
            JAN1_2024 + 6 * D,
            JAN1_2024,
            JAN1_2024 + D,
        ]);
        let rules = Rules {
            last: Some(2),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &rules), vec!["p02", "p03"]);
    }

    #[test]
    fn the_newest_is_always_kept() {
        let pts = chain(&[JAN1_2024, JAN1_2024 + D]);
        let rules = Rules {
            monthly: Some(0),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &rules), vec!["p01"]);
    }

    #[test]
    fn daily_keeps_the_last_point_of_each_day_at_midnight_edges() {
        // 23:59:59 and 00:00:00 are different days; two points on one day keep only the later.
        let t = [
            JAN1_2024 + D - 1,      // Jan 1 23:59:59
            JAN1_2024 + D,          // Jan 2 00:00:00
            JAN1_2024 + D + 10 * H, // Jan 2 10:00
            JAN1_2024 + 3 * D,      // Jan 4
        ];
        let pts = chain(&t);
        let rules = Rules {
            daily: Some(3),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &rules), vec!["p00", "p02", "p03"]);
        let two = Rules {
            daily: Some(2),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &two), vec!["p02", "p03"]);
    }

    #[test]
    fn hourly_buckets_are_clock_hours() {
        let pts = chain(&[JAN1_2024 + 59 * 60, JAN1_2024 + H, JAN1_2024 + H + 1]);
        let rules = Rules {
            hourly: Some(5),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &rules), vec!["p00", "p02"]);
    }

    #[test]
    fn weekly_buckets_run_monday_to_sunday_across_the_year_end() {
        // 2023-12-31 is a Sunday: same ISO week as 2023-12-25, not as 2024-01-01 (a Monday).
        let sun = JAN1_2024 - 1;
        let pts = chain(&[sun - 6 * D + 1, sun, JAN1_2024, JAN1_2024 + 6 * D]);
        let rules = Rules {
            weekly: Some(10),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &rules), vec!["p01", "p03"]);
        assert_eq!(iso_week(sun) + 1, iso_week(JAN1_2024));
    }

    #[test]
    fn monthly_handles_month_lengths_and_leap_years() {
        let feb29 = JAN1_2024 + (31 + 28) * D; // 2024-02-29
        assert_eq!(civil_from_days((feb29 / D) as i64), (2024, 2, 29));
        assert_eq!(civil_from_days(((feb29 + D) / D) as i64), (2024, 3, 1));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        let pts = chain(&[feb29, feb29 + D - 1, feb29 + D, JAN1_2024 - 1]);
        let rules = Rules {
            monthly: Some(12),
            ..Rules::default()
        };
        // p03 (2023-12-31) is a month of its own; p01 is Feb's last, p02 is March's.
        assert_eq!(kept(&pts, &rules), vec!["p01", "p02", "p03"]);
    }

    #[test]
    fn within_counts_back_from_the_newest_point_not_from_now() {
        let pts = chain(&[
            JAN1_2024,
            JAN1_2024 + 10 * D,
            JAN1_2024 + 12 * D,
            JAN1_2024 + 13 * D,
        ]);
        let rules = Rules {
            within: Some(3 * D),
            ..Rules::default()
        };
        // The edge is inclusive: exactly 3 days before the newest is kept.
        assert_eq!(kept(&pts, &rules), vec!["p01", "p02", "p03"]);
    }

    #[test]
    fn rules_are_a_union_and_protected_points_are_kept_without_counting() {
        let mut pts = chain(&[
            JAN1_2024,
            JAN1_2024 + D,
            JAN1_2024 + 2 * D,
            JAN1_2024 + 3 * D,
        ]);
        pts[2].protected = true;
        let rules = Rules {
            last: Some(2),
            ..Rules::default()
        };
        // p02 is protected: `last 2` still keeps two unprotected points, p03 and p01.
        assert_eq!(kept(&pts, &rules), vec!["p01", "p02", "p03"]);
        let union = Rules {
            last: Some(1),
            monthly: Some(1),
            within: Some(D),
            ..Rules::default()
        };
        pts[2].protected = false;
        let (marks, _) = decide(&pts, &union, |_| true).unwrap();
        assert_eq!(
            marks[3].reasons,
            vec!["newest", "last", "monthly", "within"]
        );
        assert_eq!(marks[2].reasons, vec!["within"]);
        assert!(!marks[1].keep && !marks[0].keep);
    }

    #[test]
    fn chains_are_decided_per_point_and_names_apart() {
        // A full, its incrementals and a differential of another name: each name keeps its
        // newest; dropping a full its kept points depend on is the executor's to merge.
        let mut pts = chain(&[JAN1_2024, JAN1_2024 + H, JAN1_2024 + 2 * H]);
        let mut other = point(3, JAN1_2024 + 3 * H);
        other.name = "other".into();
        other.kind = ImageKind::Full;
        other.parent = None;
        pts.push(other);
        let rules = Rules {
            last: Some(1),
            ..Rules::default()
        };
        assert_eq!(kept(&pts, &rules), vec!["p02", "p03"]);
    }

    #[test]
    fn max_size_drops_the_oldest_until_it_fits_never_the_newest_or_protected() {
        let mut pts = chain(&[
            JAN1_2024,
            JAN1_2024 + D,
            JAN1_2024 + 2 * D,
            JAN1_2024 + 3 * D,
        ]);
        pts[1].protected = true;
        let rules = Rules {
            max_size: Some(100),
            ..Rules::default()
        };
        // Each point "holds" 100 bytes: fits when at most one is kept — impossible with the
        // newest and a protected one, so p00 and p02 go and the answer is "does not fit".
        let (marks, fit) = decide(&pts, &rules, |m| {
            m.iter().filter(|m| m.keep).count() as u64 * 100 <= 100
        })
        .unwrap();
        assert!(!fit);
        let keep: Vec<bool> = marks.iter().map(|m| m.keep).collect();
        assert_eq!(keep, vec![false, true, false, true]);
        assert_eq!(marks[0].reasons, vec!["max-size"]);
        // With a keep rule too, max-size removes from what the rules kept, oldest first.
        let both = Rules {
            last: Some(3),
            max_size: Some(1),
            ..Rules::default()
        };
        pts[1].protected = false;
        let (marks, fit) =
            decide(&pts, &both, |m| m.iter().filter(|m| m.keep).count() <= 2).unwrap();
        assert!(fit);
        let keep: Vec<bool> = marks.iter().map(|m| m.keep).collect();
        assert_eq!(keep, vec![false, false, true, true]);
    }
}
