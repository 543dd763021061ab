//! One goal's result: the value of every round, its median and worst round, the bar it must
//! reach, the absolutes for the record, and any correctness check that failed.

/// What the values are: a ratio (production path over baseline) or an amount of memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Ratio,
    MiB,
}

pub struct Outcome {
    pub goal: &'static str,
    pub what: String,
    pub unit: Unit,
    pub must_reach: f64,
    pub higher_is_better: bool,
    /// One value per round.
    pub values: Vec<f64>,
    pub absolutes: String,
    /// Correctness checks that failed: the values cannot be trusted then.
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn new(goal: &'static str, what: impl Into<String>) -> Self {
        Self {
            goal,
            what: what.into(),
            unit: Unit::Ratio,
            must_reach: f64::NAN,
            higher_is_better: true,
            values: Vec::new(),
            absolutes: String::new(),
            failures: Vec::new(),
        }
    }

    /// A value that must be at least `bar`.
    pub fn at_least(mut self, bar: f64) -> Self {
        self.must_reach = bar;
        self.higher_is_better = true;
        self
    }

    /// A value that must be at most `bar`.
    pub fn at_most(mut self, bar: f64) -> Self {
        self.must_reach = bar;
        self.higher_is_better = false;
        self
    }

    pub fn in_mib(mut self) -> Self {
        self.unit = Unit::MiB;
        self
    }

    pub fn median(&self) -> f64 {
        median(&self.values)
    }

    pub fn worst(&self) -> f64 {
        let pick = if self.higher_is_better {
            f64::min
        } else {
            f64::max
        };
        self.values.iter().copied().reduce(pick).unwrap_or(f64::NAN)
    }

    pub fn met(&self) -> bool {
        if self.higher_is_better {
            self.median() >= self.must_reach
        } else {
            self.median() <= self.must_reach
        }
    }

    fn verdict(&self) -> &'static str {
        if !self.failures.is_empty() {
            "FAILED"
        } else if self.met() {
            "MET"
        } else {
            "MISSED"
        }
    }

    pub fn line(&self) -> String {
        let cmp = if self.higher_is_better { "≥" } else { "≤" };
        let unit = match self.unit {
            Unit::Ratio => "",
            Unit::MiB => " MiB",
        };
        let mut line = format!(
            "{:<5} {:<62} median {:>7.3}  worst {:>7.3}  must {cmp} {}{unit}  {:<6} | {}",
            self.goal,
            self.what,
            self.median(),
            self.worst(),
            self.must_reach,
            self.verdict(),
            self.absolutes
        );
        for failure in &self.failures {
            line.push_str(&format!("\n      CORRECTNESS CHECK FAILED: {failure}"));
        }
        line
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "goal": self.goal,
            "what": self.what,
            "unit": match self.unit { Unit::Ratio => "ratio", Unit::MiB => "MiB" },
            "median": self.median(),
            "worst": self.worst(),
            "must_reach": self.must_reach,
            "higher_is_better": self.higher_is_better,
            "met": self.met() && self.failures.is_empty(),
            "verdict": self.verdict(),
            "values": self.values,
            "absolutes": self.absolutes,
            "correctness_failures": self.failures,
        })
    }
}

/// The middle value (the mean of the two middles for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
