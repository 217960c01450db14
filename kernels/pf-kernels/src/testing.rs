//! Test helpers: a replayable random generator, double-precision erf and GELU (the ground
//! truth the kernels' float arithmetic is measured against) and the token grid's windows.

/// A small deterministic generator, so that a failing case can be replayed.
pub struct Lcg(pub u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() as usize) % n
    }

    /// Uniform in `(0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next() as f64 + 0.5) / (1u64 << 31) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (core::f64::consts::TAU * v).cos()
    }
}

/// The error function in double precision (relative error below 1e-15): the Maclaurin series
/// below 1.5, where its alternating terms lose hardly a digit, and erfc's continued fraction
/// (80 terms) above.
pub fn erf64(x: f64) -> f64 {
    let a = x.abs();
    let e = if a < 1.5 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * core::f64::consts::FRAC_2_SQRT_PI
    } else {
        let mut f = a;
        for k in (1..=80).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (f * core::f64::consts::PI.sqrt())
    };
    e.copysign(x)
}

pub fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf64(x * core::f64::consts::FRAC_1_SQRT_2))
}

/// The values of the 3×3 window (stride 1, padding 1) around `token` of channel `c` in
/// `[batch, height · width, channels]` data, in row-major order.
pub fn window(xs: &[f32], [_, n, channels]: [usize; 3], [height, width]: [usize; 2], b: usize, token: usize, c: usize) -> Vec<f32> {
    let (oh, ow) = (token / width, token % width);
    let mut out = Vec::with_capacity(9);
    for ih in oh.saturating_sub(1)..(oh + 2).min(height) {
        for iw in ow.saturating_sub(1)..(ow + 2).min(width) {
            out.push(xs[(b * n + ih * width + iw) * channels + c]);
        }
    }
    out
}

#[test]
fn erf64_is_accurate() {
    // Values of erf to 17 digits (mpmath, 40-digit arithmetic).
    for (x, e) in [
        (1e-3, 0.0011283787909692365),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (1.499, 0.9659860376518566),
        (1.5, 0.9661051464753108),
        (2.999, 0.9999777698314002),
        (3.0, 0.9999779095030014),
        (4.5, 0.9999999998033839),
    ] {
        assert!((erf64(x) - e).abs() <= 1e-15 * e, "erf64({x}) = {}, expected {e}", erf64(x));
        assert_eq!(erf64(-x), -erf64(x));
    }
}
