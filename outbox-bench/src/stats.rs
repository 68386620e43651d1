//! Repetitions: every figure of the bench is the median of several repetitions, run
//! interleaved (repetition 1 of every configuration of a table, then repetition 2, ...), with
//! the min–max shown beside it; ratios are taken between medians of the same run.

use std::future::Future;

/// The values one figure took over the repetitions of a run.
#[derive(Debug, Clone, Default)]
pub struct Spread {
    values: Vec<f64>,
}

impl Spread {
    /// A spread of `values` (non-finite ones are dropped).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut s = Spread::default();
        for v in values {
            s.push(v);
        }
        s
    }

    /// Add one repetition's value (non-finite values are dropped).
    pub fn push(&mut self, v: f64) {
        if v.is_finite() {
            self.values.push(v);
        }
    }

    /// How many repetitions gave a value.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no repetition gave a value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median (the mean of the middle two for an even count); NaN when empty.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The smallest value; NaN when empty.
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    /// The largest value; NaN when empty.
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// (max − min) ÷ median, in percent.
    pub fn spread_pct(&self) -> f64 {
        (self.max() - self.min()) / self.median() * 100.0
    }

    /// "median (min–max)" with `fmt` for each number; "-" when empty; the median alone for
    /// one value.
    pub fn cell_with(&self, fmt: impl Fn(f64) -> String) -> String {
        match self.len() {
            0 => "-".into(),
            1 => fmt(self.median()),
            _ => format!(
                "{} ({}–{})",
                fmt(self.median()),
                fmt(self.min()),
                fmt(self.max())
            ),
        }
    }

    /// A rate cell: whole numbers.
    pub fn rate_cell(&self) -> String {
        self.cell_with(|v| format!("{v:.0}"))
    }

    /// A ratio or milliseconds cell: two decimals.
    pub fn cell2(&self) -> String {
        self.cell_with(|v| format!("{v:.2}"))
    }
}

/// Run `jobs` jobs `reps` times, interleaved: every job once, then every job again, and so
/// on. `run(job, rep)` runs one; the results come back per job, in repetition order.
pub(crate) async fn interleaved<T, F, Fut>(reps: usize, jobs: usize, mut run: F) -> Vec<Vec<T>>
where
    F: FnMut(usize, usize) -> Fut,
    Fut: Future<Output = T>,
{
    let mut out: Vec<Vec<T>> = (0..jobs).map(|_| Vec::with_capacity(reps)).collect();
    for rep in 0..reps.max(1) {
        for (job, results) in out.iter_mut().enumerate() {
            results.push(run(job, rep).await);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of([3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.median(), 2.0);
        assert_eq!(s.cell_with(|v| format!("{v:.0}")), "2 (1–3)");
        assert_eq!(Spread::of([1.0, 4.0]).median(), 2.5);
        assert!(Spread::default().median().is_nan());
        assert_eq!(Spread::default().rate_cell(), "-");
    }

    #[tokio::test]
    async fn repetitions_interleave() {
        let mut order = Vec::new();
        let out = interleaved(2, 3, |job, rep| {
            order.push((rep, job));
            async move { job * 10 + rep }
        })
        .await;
        assert_eq!(order, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
        assert_eq!(out, vec![vec![0, 1], vec![10, 11], vec![20, 21]]);
    }
}
