//! Replay of finished runs at human speed: one position shared by every lane on screen, so a
//! Compare pair (NTP and ZipAR) races at the same pass rate.

/// By default a replay of the longest run on screen lasts about this long.
pub const DEFAULT_REPLAY_S: f64 = 5.0;

/// Slowest replay speed (passes per second).
pub const MIN_SPEED: f64 = 0.1;

/// Longest frame step the player takes: a stalled frame does not jump the replay to its end.
const MAX_FRAME_S: f64 = 0.25;

/// Play / pause, step, speed and loop over the passes of the runs on screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Player {
    /// Passes shown: every cell produced in a pass `< position.floor()` is on screen. Runs
    /// from 0 to the longest run's pass count; a shorter run is complete once it has passed
    /// its own count.
    position: f64,
    /// Whether the position advances with time.
    pub playing: bool,
    /// Passes per second; `None`: the longest run lasts [`DEFAULT_REPLAY_S`].
    pub speed: Option<f64>,
    /// Start again from the first pass at the end.
    pub looping: bool,
    /// The longest run's pass count (the end of the range).
    longest: usize,
}

impl Default for Player {
    fn default() -> Self {
        Self {
            position: 0.0,
            playing: false,
            speed: None,
            looping: false,
            longest: 0,
        }
    }
}

impl Player {
    /// New runs finished with `longest` passes at most: show them complete, paused.
    pub fn reset(&mut self, longest: usize) {
        self.longest = longest;
        self.position = longest as f64;
        self.playing = false;
    }

    /// The end of the range.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// Passes shown (0..=longest).
    pub fn shown(&self) -> usize {
        (self.position.floor().max(0.0) as usize).min(self.longest)
    }

    /// Moves to `passes` shown (clamped) and pauses.
    pub fn seek(&mut self, passes: usize) {
        self.position = passes.min(self.longest) as f64;
        self.playing = false;
    }

    /// One pass forward (`delta` = 1) or back (-1), paused.
    pub fn step(&mut self, delta: i64) {
        let now = self.shown() as i64;
        self.seek((now + delta).max(0) as usize);
    }

    /// Passes per second in effect.
    pub fn passes_per_s(&self) -> f64 {
        self.speed
            .unwrap_or(self.longest as f64 / DEFAULT_REPLAY_S)
            .max(MIN_SPEED)
    }

    /// Play from where it is (from the start when at the end), or pause.
    pub fn toggle(&mut self) {
        if self.playing {
            self.playing = false;
        } else {
            if self.shown() >= self.longest {
                self.position = 0.0;
            }
            self.playing = self.longest > 0;
        }
    }

    /// Advances by one frame of `dt` seconds; true while playing (the caller asks for the
    /// next frame).
    pub fn advance(&mut self, dt: f64) -> bool {
        if !self.playing {
            return false;
        }
        let dt = if dt.is_finite() {
            dt.clamp(0.0, MAX_FRAME_S)
        } else {
            0.0
        };
        self.position += dt * self.passes_per_s();
        let end = self.longest as f64;
        if self.position >= end {
            if self.looping && end > 0.0 {
                self.position %= end;
            } else {
                self.position = end;
                self.playing = false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_of_the_default_speed_lasts_five_seconds() {
        let mut p = Player::default();
        p.reset(100);
        assert_eq!(p.shown(), 100);
        p.toggle();
        assert_eq!(p.shown(), 0, "play at the end starts over");
        let mut frames = 0;
        while p.advance(0.05) {
            frames += 1;
            assert!(frames < 1000);
        }
        assert_eq!(p.shown(), 100);
        assert!(!p.playing);
        // 5 s at 50 ms a frame
        assert!((99..=101).contains(&frames), "{frames} frames");
    }

    #[test]
    fn steps_move_one_pass_and_stay_in_range() {
        let mut p = Player::default();
        p.reset(3);
        p.step(1);
        assert_eq!(p.shown(), 3);
        p.step(-1);
        assert_eq!(p.shown(), 2);
        p.seek(0);
        p.step(-1);
        assert_eq!(p.shown(), 0);
        p.step(1);
        assert_eq!(p.shown(), 1);
    }

    #[test]
    fn looping_wraps_and_a_stalled_frame_moves_a_quarter_second_at_most() {
        let mut p = Player {
            speed: Some(10.0),
            looping: true,
            ..Player::default()
        };
        p.reset(20);
        p.toggle();
        p.advance(10.0);
        assert_eq!(p.shown(), 2, "at most 0.25 s of passes");
        for _ in 0..10 {
            p.advance(0.25);
        }
        assert!(p.playing, "a loop never stops");
        assert!(p.shown() < 20);
        p.toggle();
        assert!(!p.playing);
    }
}
