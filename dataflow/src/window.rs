//! Pure event-time arithmetic of sliding windows, panes and lateness (docs/semantics.md).

use crate::config::DataflowConfig;

/// Watermark before any event: nothing is complete.
pub const WM_MIN: i64 = i64::MIN;
/// Watermark after a bounded input ends: everything is complete.
pub const WM_MAX: i64 = i64::MAX;

/// Window geometry and lateness, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windowing {
    pub slide: i64,
    pub size: i64,
    pub lateness: i64,
}

impl Windowing {
    pub fn new(cfg: &DataflowConfig) -> Self {
        Self {
            slide: cfg.window_slide.0,
            size: cfg.window_size.0,
            lateness: cfg.allowed_lateness.0,
        }
    }

    pub fn panes_per_window(&self) -> i64 {
        self.size / self.slide
    }

    /// Pane index of an event time.
    pub fn pane(&self, t: i64) -> i64 {
        t.div_euclid(self.slide)
    }

    /// End of the last window that contains pane `p`.
    pub fn last_window_end(&self, p: i64) -> i64 {
        (p + self.panes_per_window()).saturating_mul(self.slide)
    }

    /// Whether the window ending at `end` has been emitted once the watermark is `wm`.
    pub fn emitted(&self, end: i64, wm: i64) -> bool {
        end.saturating_add(self.lateness) <= wm
    }

    /// An event is late when every window containing it was emitted before it arrived.
    pub fn is_late(&self, t: i64, wm_before: i64) -> bool {
        self.emitted(self.last_window_end(self.pane(t)), wm_before)
    }

    /// A pane is live while its last window is not emitted; after that it may be deleted.
    pub fn pane_live(&self, p: i64, wm: i64) -> bool {
        !self.emitted(self.last_window_end(p), wm)
    }

    /// The first window end that is not emitted at watermark `wm` (`None` at `WM_MAX`).
    pub fn first_open_end(&self, wm: i64) -> Option<i64> {
        if wm == WM_MAX {
            return None;
        }
        if wm == WM_MIN {
            return Some(WM_MIN);
        }
        // smallest multiple of slide E with E + lateness > wm
        let bound = wm.saturating_sub(self.lateness);
        Some(
            bound
                .div_euclid(self.slide)
                .saturating_add(1)
                .saturating_mul(self.slide),
        )
    }

    /// Emission epoch of a watermark: windows emitted so far are exactly those ending at or
    /// before `epoch * slide`. Two watermarks in the same epoch emit the same windows.
    pub fn epoch(&self, wm: i64) -> i64 {
        match wm {
            WM_MIN => i64::MIN,
            WM_MAX => i64::MAX,
            _ => wm.saturating_sub(self.lateness).div_euclid(self.slide),
        }
    }

    /// Whether a history entry at `h_ts` belongs to the history used for an event at `t`.
    pub fn history_entry_valid(h_ts: i64, t: i64, wm_before: i64, gap: i64, lateness: i64) -> bool {
        h_ts.abs_diff(t) <= gap as u64
            && h_ts >= wm_before.saturating_sub(gap).saturating_sub(lateness)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(lateness: i64) -> Windowing {
        Windowing {
            slide: 60_000,
            size: 600_000,
            lateness,
        }
    }

    #[test]
    fn lateness_boundaries() {
        let win = w(0);
        // t in pane 10; last window containing it ends at (10 + 10) * 60s = 1_200_000.
        assert_eq!(win.last_window_end(win.pane(600_001)), 1_200_000);
        assert!(!win.is_late(600_001, 1_199_999));
        assert!(win.is_late(600_001, 1_200_000));
        assert!(!w(1).is_late(600_001, 1_200_000));
        assert!(!win.is_late(600_001, WM_MIN));
        assert!(win.is_late(600_001, WM_MAX));
    }

    #[test]
    fn first_open_end_and_epoch_agree() {
        let win = w(5_000);
        for wm in [-1_000_000, 0, 1, 59_999, 60_000, 64_999, 65_000, 3_000_000] {
            let e = win.first_open_end(wm).unwrap();
            assert!(!win.emitted(e, wm));
            assert!(win.emitted(e - win.slide, wm));
            assert_eq!(win.epoch(wm) * win.slide, e - win.slide);
        }
        assert_eq!(win.first_open_end(WM_MAX), None);
    }

    #[test]
    fn negative_times_use_floor_panes() {
        assert_eq!(w(0).pane(-1), -1);
        assert_eq!(w(0).pane(0), 0);
    }
}
