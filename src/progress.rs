//! What a long run shows while it works: a step line from the first second (a spinner on a
//! terminal, one log line per step otherwise), the progress bar (drawn only on a terminal) and
//! the process's own peak memory for its summary.
use indicatif::style::ProgressTracker;
use indicatif::{MultiProgress, ProgressBar, ProgressState, ProgressStyle};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How the step lines start when stderr is not a terminal ("clipmask: loading ViT-B/16 (fp16,
/// cuda:0)"), so that logs show what the process is doing before its first image.
pub const STEP_PREFIX: &str = "clipmask: ";

/// Images counted past the first completed ones before the bar shows an ETA.
const ETA_AFTER: u64 = 3;

/// The one place the step spinners and the download bars are drawn, so that they share the
/// terminal instead of overwriting each other (hidden when stderr is not a terminal).
fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(MultiProgress::new)
}

/// A step before the work starts (loading the model, encoding the text features): a spinner
/// with its text while it lasts on a terminal, one line on stderr otherwise. Ends when dropped.
pub struct Step {
    spinner: Option<ProgressBar>,
}

impl Step {
    pub fn start(what: impl Into<String>) -> Step {
        let what = what.into();
        if !std::io::stderr().is_terminal() || multi().is_hidden() {
            eprintln!("{STEP_PREFIX}{what}");
            return Step { spinner: None };
        }
        let spinner = multi().add(ProgressBar::new_spinner());
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        spinner.set_message(what);
        spinner.enable_steady_tick(Duration::from_millis(100));
        Step { spinner: Some(spinner) }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
            multi().remove(&s);
        }
    }
}

/// `bar` drawn together with the step spinners (a download while the model loads).
pub fn attach(bar: ProgressBar) -> ProgressBar {
    multi().add(bar)
}

/// A line on stderr above the step spinners (a warning while a step runs).
pub fn note(line: &str) {
    multi().suspend(|| eprintln!("{line}"));
}

/// Runs `f` with the step spinners hidden, for work that draws its own progress (the Hugging
/// Face downloads).
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    multi().suspend(f)
}

/// A bar counting `unit`s ("image", "template"): drawn on a terminal, hidden otherwise (logs
/// get summary lines instead). The rate has one decimal; the ETA waits for a few units past the
/// first ones (which carry the warm-up) and uses the rate measured since then.
pub fn progress_bar(len: u64, unit: &'static str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::hidden())
    };
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit}s  {{rate}}  ETA {{steady_eta}}  {{msg}}");
    let style = ProgressStyle::with_template(&template)
        .map(|s| {
            s.with_key("rate", Speed { show: Show::Rate, unit, anchor: None })
                .with_key("steady_eta", Speed { show: Show::Eta, unit, anchor: None })
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

#[derive(Clone, Copy)]
enum Show {
    Rate,
    Eta,
}

/// The bar's rate and ETA: measured from the first update that counted a unit (the anchor), so
/// that the start-up of the first batch does not inflate the ETA.
#[derive(Clone)]
struct Speed {
    show: Show,
    unit: &'static str,
    anchor: Option<(u64, Instant)>,
}

impl Speed {
    /// Units per second: since the anchor once units were counted past it, else since the start.
    fn per_sec(&self, state: &ProgressState, now: Instant) -> Option<f64> {
        let pos = state.pos();
        if let Some((p0, t0)) = self.anchor {
            let dt = now.saturating_duration_since(t0).as_secs_f64();
            if pos > p0 && dt > 0.0 {
                return Some((pos - p0) as f64 / dt);
            }
        }
        let dt = state.elapsed().as_secs_f64();
        (pos > 0 && dt > 0.0).then(|| pos as f64 / dt)
    }
}

impl ProgressTracker for Speed {
    fn clone_box(&self) -> Box<dyn ProgressTracker> {
        Box::new(self.clone())
    }

    fn tick(&mut self, state: &ProgressState, now: Instant) {
        if self.anchor.is_none() && state.pos() > 0 {
            self.anchor = Some((state.pos(), now));
        }
    }

    fn reset(&mut self, _: &ProgressState, _: Instant) {
        self.anchor = None;
    }

    fn write(&self, state: &ProgressState, w: &mut dyn std::fmt::Write) {
        let now = Instant::now();
        let rate = self.per_sec(state, now);
        let _ = match self.show {
            Show::Rate => w.write_str(&rate_text(rate, self.unit)),
            Show::Eta => {
                let warm = self.anchor.is_some_and(|(p0, _)| state.pos() >= p0 + ETA_AFTER);
                match (rate, state.len()) {
                    (Some(r), Some(len)) if warm && r > 0.0 => {
                        w.write_str(&eta_text(len.saturating_sub(state.pos()) as f64 / r))
                    }
                    _ => w.write_str("-"),
                }
            }
        };
    }
}

/// "12.3 images/s", or "4.2 s/image" below 0.1 per second, or "- images/s" before a measure.
pub fn rate_text(per_sec: Option<f64>, unit: &str) -> String {
    match per_sec {
        Some(r) if r.is_finite() && r >= 0.1 => format!("{r:.1} {unit}s/s"),
        Some(r) if r.is_finite() && r > 0.0 => format!("{:.1} s/{unit}", 1.0 / r),
        _ => format!("- {unit}s/s"),
    }
}

/// A remaining time in whole seconds, minutes or hours; under a second is "<1s", never "0s".
pub fn eta_text(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "-".into();
    }
    let s = seconds.round() as u64;
    let mut out = String::new();
    let _ = match s {
        0 => write!(out, "<1s"),
        1..=59 => write!(out, "{s}s"),
        60..=3599 => write!(out, "{}m {:02}s", s / 60, s % 60),
        _ => write!(out, "{}h {:02}m", s / 3600, (s % 3600) / 60),
    };
    out
}

/// VmHWM from /proc/self/status.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_have_one_decimal_and_etas_are_never_zero() {
        assert_eq!(rate_text(Some(12.345), "image"), "12.3 images/s");
        assert_eq!(rate_text(Some(0.05), "image"), "20.0 s/image");
        assert_eq!(rate_text(None, "template"), "- templates/s");
        assert_eq!(rate_text(Some(f64::INFINITY), "image"), "- images/s");
        assert_eq!(eta_text(0.2), "<1s");
        assert_eq!(eta_text(42.4), "42s");
        assert_eq!(eta_text(125.0), "2m 05s");
        assert_eq!(eta_text(7300.0), "2h 01m");
        assert_eq!(eta_text(f64::INFINITY), "-");
    }
}
