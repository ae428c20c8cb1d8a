//! The small emoji classifier that ships with the built-in model (trained by
//! `training/train_classifier.py`): the image-space metric of `eval` (top-1 / top-5 against the
//! conditioning class, and a Frechet distance on its pooled features, like the paper's
//! FID-vs-window table).
//!
//! 3x3 convolutions (BatchNorm folded in at export) with ReLU, their strides listed in the
//! file's metadata, a global average pool (the feature vector) and a linear head. The file also carries the mean and covariance
//! of the features of the real images over the eval class subset. Depends on candle only.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::model::RgbImage;

/// Feature statistics of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Mean feature vector.
    pub mean: Vec<f64>,
    /// Covariance, row-major `[d, d]`.
    pub cov: Vec<f64>,
}

impl FeatureStats {
    /// Mean and (unbiased) covariance of `features` (one row per image, all of length d).
    pub fn of(features: &[Vec<f32>]) -> anyhow::Result<Self> {
        let n = features.len();
        anyhow::ensure!(n >= 2, "feature statistics need at least 2 images, got {n}");
        let d = features[0].len();
        let mut mean = vec![0f64; d];
        for f in features {
            anyhow::ensure!(f.len() == d, "feature rows differ in length");
            for (m, &x) in mean.iter_mut().zip(f) {
                *m += x as f64 / n as f64;
            }
        }
        let mut cov = vec![0f64; d * d];
        for f in features {
            for i in 0..d {
                let a = f[i] as f64 - mean[i];
                for j in 0..d {
                    cov[i * d + j] += a * (f[j] as f64 - mean[j]);
                }
            }
        }
        cov.iter_mut().for_each(|c| *c /= (n - 1) as f64);
        Ok(Self { mean, cov })
    }
}

/// What the classifier says about a batch of images, one row per image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scored {
    /// Pooled features (the Frechet distance's space).
    pub features: Vec<Vec<f32>>,
    /// Class logits.
    pub logits: Vec<Vec<f32>>,
}

/// The classifier and the real-image statistics it was shipped with.
#[derive(Debug)]
pub struct Classifier {
    convs: Vec<Conv2d>,
    head: Linear,
    /// Features of the real images of the eval class subset.
    pub real: FeatureStats,
    /// The eval class subset: every `class_stride`-th class.
    pub class_stride: u32,
    /// The classifier's own top-1 accuracy on the held-out real images (from the file).
    pub heldout_top1: Option<f32>,
    device: Device,
}

impl Classifier {
    /// Loads `classifier.safetensors` (see the module doc).
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)
            .with_context(|| format!("cannot read the classifier {}", path.display()))?;
        let meta = safetensors_metadata(path)?;
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        let n = (0..)
            .take_while(|i| tensors.contains_key(&format!("convs.{i}.weight")))
            .count();
        anyhow::ensure!(n > 0, "the classifier has no convolutions (convs.0.weight)");
        let strides = strides(meta.get("strides").map(String::as_str), n)?;
        let mut convs = Vec::with_capacity(n);
        for (i, stride) in strides.into_iter().enumerate() {
            let w = vb.get_unchecked(&format!("convs.{i}.weight"))?;
            let (cout, cin, kh, _) = w.dims4()?;
            let cfg = Conv2dConfig {
                padding: kh / 2,
                stride,
                ..Default::default()
            };
            convs.push(candle_nn::conv2d(
                cin,
                cout,
                kh,
                cfg,
                vb.pp(format!("convs.{i}")),
            )?);
        }
        let (classes, dim) = vb.get_unchecked("head.weight")?.dims2()?;
        let head = candle_nn::linear(dim, classes, vb.pp("head"))?;
        let to_f64 = |name: &str| -> anyhow::Result<Vec<f64>> {
            let t = tensors
                .get(name)
                .with_context(|| format!("the classifier has no tensor {name}"))?;
            Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
        };
        let real = FeatureStats {
            mean: to_f64("real.mean")?,
            cov: to_f64("real.cov")?,
        };
        anyhow::ensure!(
            real.mean.len() == dim && real.cov.len() == dim * dim,
            "the classifier's real-image statistics do not match its {dim} features"
        );
        Ok(Self {
            convs,
            head,
            real,
            class_stride: meta
                .get("eval_class_stride")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1),
            heldout_top1: meta.get("heldout_top1").and_then(|s| s.parse().ok()),
            device: device.clone(),
        })
    }

    /// Pooled features and logits of a batch of images (all of one size).
    pub fn run(&self, images: &[&RgbImage]) -> anyhow::Result<Scored> {
        let Some(first) = images.first() else {
            return Ok(Scored::default());
        };
        let (w, h) = (first.width, first.height);
        let mut data = Vec::with_capacity(images.len() * w * h * 3);
        for im in images {
            anyhow::ensure!(
                im.width == w && im.height == h,
                "images of one batch must share a size"
            );
            data.extend(im.pixels.iter().map(|&p| p as f32 / 127.5 - 1.0));
        }
        let mut x = Tensor::from_vec(data, (images.len(), h, w, 3), &self.device)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?;
        }
        let features = x.mean((2, 3))?;
        let logits = self.head.forward(&features)?;
        Ok(Scored {
            features: features.to_vec2()?,
            logits: logits.to_vec2()?,
        })
    }
}

/// The convolutions' strides from the file's `strides` entry ("2,1,2,..."); files without it
/// are the first classifier, all stride 2.
fn strides(entry: Option<&str>, convs: usize) -> anyhow::Result<Vec<usize>> {
    let Some(entry) = entry else {
        return Ok(vec![2; convs]);
    };
    let strides = entry
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&x| (1..=4).contains(&x))
        })
        .collect::<Option<Vec<_>>>()
        .with_context(|| {
            format!("the classifier's strides {entry:?} are not numbers from 1 to 4")
        })?;
    anyhow::ensure!(
        strides.len() == convs,
        "the classifier lists {} strides for {convs} convolutions",
        strides.len()
    );
    Ok(strides)
}

fn safetensors_metadata(path: &Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Whether `class` is in the top-`k` of `logits`.
pub fn in_top_k(logits: &[f32], class: u32, k: usize) -> bool {
    let Some(&target) = logits.get(class as usize) else {
        return false;
    };
    logits.iter().filter(|&&l| l > target).count() < k
}

/// Frechet distance between two Gaussians (the FID formula):
/// `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> anyhow::Result<f64> {
    let d = a.mean.len();
    anyhow::ensure!(
        b.mean.len() == d && a.cov.len() == d * d && b.cov.len() == d * d,
        "feature statistics of different sizes"
    );
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |c: &[f64]| (0..d).map(|i| c[i * d + i]).sum::<f64>();
    let sqrt_a = sym_sqrt(&a.cov, d);
    let m = matmul(&matmul(&sqrt_a, &b.cov, d), &sqrt_a, d);
    let (eig, _) = sym_eigen(&m, d);
    let tr_sqrt: f64 = eig.iter().map(|&l| l.max(0.0).sqrt()).sum();
    Ok(mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * tr_sqrt)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let x = a[i * d + k];
            if x != 0.0 {
                for j in 0..d {
                    out[i * d + j] += x * b[k * d + j];
                }
            }
        }
    }
    out
}

/// Square root of a symmetric positive semi-definite matrix (negative eigenvalues clamped).
fn sym_sqrt(a: &[f64], d: usize) -> Vec<f64> {
    let (eig, v) = sym_eigen(a, d);
    let mut out = vec![0f64; d * d];
    for (k, &l) in eig.iter().enumerate() {
        let s = l.max(0.0).sqrt();
        for i in 0..d {
            let vi = v[i * d + k] * s;
            for j in 0..d {
                out[i * d + j] += vi * v[j * d + k];
            }
        }
    }
    out
}

/// Eigenvalues and eigenvectors (columns of the returned row-major matrix) of a symmetric
/// matrix, by cyclic Jacobi rotations: small, exact to rounding, fine for d of a few hundred.
fn sym_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = a.to_vec();
    let mut v = vec![0f64; d * d];
    (0..d).for_each(|i| v[i * d + i] = 1.0);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * d + j].powi(2))
            .sum();
        let scale: f64 = m.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
        if off <= 1e-24 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = m[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (m[q * d + q] - m[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (mkp, mkq) = (m[k * d + p], m[k * d + q]);
                    m[k * d + p] = c * mkp - s * mkq;
                    m[k * d + q] = s * mkp + c * mkq;
                }
                for k in 0..d {
                    let (mpk, mqk) = (m[p * d + k], m[q * d + k]);
                    m[p * d + k] = c * mpk - s * mqk;
                    m[q * d + k] = s * mpk + c * mqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| m[i * d + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_come_from_the_file_or_default_to_two() {
        assert_eq!(strides(None, 4).unwrap(), vec![2, 2, 2, 2]);
        assert_eq!(strides(Some("2,1, 2,1"), 4).unwrap(), vec![2, 1, 2, 1]);
        let e = strides(Some("2,1"), 4).unwrap_err().to_string();
        assert!(e.contains("2 strides for 4 convolutions"), "{e}");
        assert!(strides(Some("2,x,2,1"), 4).is_err());
        assert!(strides(Some("2,0,2,1"), 4).is_err());
    }

    fn stats(mean: Vec<f64>, cov: Vec<f64>) -> FeatureStats {
        FeatureStats { mean, cov }
    }

    #[test]
    fn eigen_decomposition_reconstructs_the_matrix() {
        let a = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let (eig, v) = sym_eigen(&a, 3);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| v[i * 3 + k] * eig[k] * v[j * 3 + k]).sum();
                assert!((r - a[i * 3 + j]).abs() < 1e-10, "{i},{j}: {r}");
            }
        }
        let s = sym_sqrt(&a, 3);
        let back = matmul(&s, &s, 3);
        for (x, y) in back.iter().zip(&a) {
            assert!((x - y).abs() < 1e-10);
        }
    }

    #[test]
    fn frechet_distance_matches_the_closed_form() {
        // Identical Gaussians: 0.
        let a = stats(vec![1.0, 2.0], vec![2.0, 0.3, 0.3, 1.0]);
        assert!(frechet_distance(&a, &a).unwrap_or(f64::NAN).abs() < 1e-9);
        // Diagonal covariances: sum (mu diff)^2 + (sqrt(s1) - sqrt(s2))^2 per dimension.
        let a = stats(vec![0.0, 0.0], vec![4.0, 0.0, 0.0, 1.0]);
        let b = stats(vec![1.0, -2.0], vec![1.0, 0.0, 0.0, 9.0]);
        let want = 1.0 + 4.0 + (2.0f64 - 1.0).powi(2) + (1.0f64 - 3.0).powi(2);
        let got = frechet_distance(&a, &b).unwrap_or(f64::NAN);
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn feature_stats_and_top_k() {
        let s =
            FeatureStats::of(&[vec![1.0, 0.0], vec![3.0, 2.0]]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.mean, vec![2.0, 1.0]);
        assert_eq!(s.cov, vec![2.0, 2.0, 2.0, 2.0]);
        assert!(FeatureStats::of(&[vec![1.0]]).is_err());
        let logits = [0.1, 0.9, 0.5, 0.7];
        assert!(in_top_k(&logits, 1, 1));
        assert!(!in_top_k(&logits, 2, 2));
        assert!(in_top_k(&logits, 2, 3));
        assert!(!in_top_k(&logits, 9, 5));
    }
}
