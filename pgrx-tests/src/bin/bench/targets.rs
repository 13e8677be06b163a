//! The performance targets: each a figure measured in this run against a goal, listed at the top of the
//! document, and reported on stderr when missed.

use std::fmt::Write as _;

/// Which side of its goal a figure must be on.
#[derive(Clone, Copy)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

/// What a figure is, for display.
#[derive(Clone, Copy)]
pub enum Unit {
    /// A rate over a baseline's rate (above 1: faster than the baseline).
    Ratio,
    /// How many times one figure is another (a time over a time, a rate over a rate, largest over smallest).
    Times,
    /// Bytes.
    Bytes,
}

impl Unit {
    fn show(self, value: f64) -> String {
        match self {
            Unit::Ratio => format!("{value:.2}"),
            Unit::Times => format!("{value:.2}×"),
            Unit::Bytes => format!("{value:.0} B"),
        }
    }
}

/// One row of the targets table.
pub struct Target {
    pub workload: String,
    pub measured: f64,
    pub goal: Goal,
    pub unit: Unit,
}

impl Target {
    pub fn new(workload: impl Into<String>, measured: f64, goal: Goal, unit: Unit) -> Target {
        Target { workload: workload.into(), measured, goal, unit }
    }

    /// Whether the figure is on the right side of its goal (a figure that could not be measured is not).
    pub fn met(&self) -> bool {
        match self.goal {
            Goal::AtLeast(goal) => self.measured >= goal,
            Goal::AtMost(goal) => self.measured <= goal,
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::AtLeast(goal) => format!("≥ {}", self.unit.show(goal)),
            Goal::AtMost(goal) => format!("≤ {}", self.unit.show(goal)),
        }
    }
}

/// The targets section of the document.
pub fn section(targets: &[Target]) -> String {
    let met = targets.iter().filter(|target| target.met()).count();
    let mut report = format!(
        "## Targets\n\n{met} of {} met. Each figure is measured in this run against a baseline measured in the same run \
         (the sections below say how); ratios of rates are sync_ext's rate over the baseline's (above 1: faster).\n\n",
        targets.len()
    );
    report.push_str("| workload | measured | target | |\n|---|---:|---:|---|\n");
    for target in targets {
        let verdict = if target.met() { "met" } else { "**missed**" };
        writeln!(report, "| {} | {} | {} | {verdict} |", target.workload, target.unit.show(target.measured), target.goal_text()).unwrap();
    }
    report
}

/// Prints every missed target to stderr.
pub fn report_missed(targets: &[Target]) {
    for target in targets.iter().filter(|target| !target.met()) {
        eprintln!("[bench] MISSED: {}: {} (target {})", target.workload, target.unit.show(target.measured), target.goal_text());
    }
}
