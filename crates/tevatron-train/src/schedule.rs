//! Learning-rate schedules with Hugging Face's formulas (`get_scheduler`): a multiplier of the
//! base rate as a pure function of the optimizer step, evaluated before each step, so step 0
//! of a warmup trains at rate 0 exactly as `LambdaLR` does.

/// `--lr_scheduler_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Linear warmup, then linear decay to 0 at the last step (HF's default).
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// The base rate throughout (no warmup, whatever the warmup flags say, as in HF).
    Constant,
    /// Linear warmup, then the base rate.
    ConstantWithWarmup,
}

impl ScheduleKind {
    /// Parses HF's names.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            _ => return None,
        })
    }
}

/// A schedule over `total` optimizer steps with `warmup` warmup steps.
#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    /// The formula.
    pub kind: ScheduleKind,
    /// `--learning_rate`.
    pub base: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

/// HF's `get_warmup_steps`: `--warmup_steps` when positive, else `ceil(total * ratio)`.
pub fn warmup_steps(total: usize, warmup_steps: usize, warmup_ratio: f64) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (total as f64 * warmup_ratio).ceil() as usize
    }
}

impl LrSchedule {
    /// The rate used by optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warm = || s / w.max(1.0);
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            _ if step < self.warmup => warm(),
            ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.base * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_hugging_face() {
        let s = |kind| LrSchedule { kind, base: 1.0, warmup: 2, total: 10 };
        let lin: Vec<f64> = (0..11).map(|i| s(ScheduleKind::Linear).lr(i)).collect();
        assert_eq!(lin[..4], [0.0, 0.5, 1.0, 0.875]);
        assert_eq!(lin[10], 0.0);
        let cos = s(ScheduleKind::Cosine);
        assert!((cos.lr(6) - 0.5).abs() < 1e-12 && cos.lr(1) == 0.5 && cos.lr(10).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Constant).lr(0), 1.0);
        assert_eq!(s(ScheduleKind::ConstantWithWarmup).lr(1), 0.5);
        assert_eq!(s(ScheduleKind::ConstantWithWarmup).lr(9), 1.0);
        assert_eq!(warmup_steps(95, 0, 0.1), 10);
        assert_eq!(warmup_steps(95, 3, 0.1), 3);
        assert_eq!(ScheduleKind::parse("cosine"), Some(ScheduleKind::Cosine));
        assert_eq!(ScheduleKind::parse("polynomial"), None);
    }
}
