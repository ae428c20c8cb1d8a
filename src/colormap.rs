//! Perceptual colour map (viridis, sampled at 9 stops and interpolated) used by the app's
//! pass and window maps and by the pass-map PNG export.

const VIRIDIS: [[f32; 3]; 9] = [
    [68.0, 1.0, 84.0],
    [71.0, 44.0, 122.0],
    [59.0, 81.0, 139.0],
    [44.0, 113.0, 142.0],
    [33.0, 144.0, 141.0],
    [39.0, 173.0, 129.0],
    [92.0, 200.0, 99.0],
    [170.0, 220.0, 50.0],
    [253.0, 231.0, 37.0],
];

/// Colour for `t` in [0, 1] (clamped).
pub fn viridis(t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        *o = (VIRIDIS[i][c] * (1.0 - f) + VIRIDIS[i + 1][c] * f).round() as u8;
    }
    out
}

/// Colour of a value on a scale from `lo` to `hi`.
pub fn scaled(v: f32, lo: f32, hi: f32) -> [u8; 3] {
    if hi > lo {
        viridis((v - lo) / (hi - lo))
    } else {
        viridis(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_and_monotone_lightness() {
        assert_eq!(viridis(0.0), [68, 1, 84]);
        assert_eq!(viridis(1.0), [253, 231, 37]);
        assert_eq!(viridis(2.0), viridis(1.0));
        let l = |c: [u8; 3]| 0.3 * c[0] as f32 + 0.59 * c[1] as f32 + 0.11 * c[2] as f32;
        let mut prev = 0.0;
        for i in 0..=20 {
            let now = l(viridis(i as f32 / 20.0));
            assert!(now >= prev - 1.0, "lightness must rise");
            prev = now;
        }
    }
}
