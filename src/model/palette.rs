//! Per-code thumbnails for live previews that cost the decoding nothing.
//!
//! A partial image used to be a real VQ decode of the partial grid, run beside the forward
//! passes on the same cores. Instead, each code's look is learned once per model: the whole
//! codebook is laid out on token grids, decoded a grid at a time (`codebook / (h*w)` decodes,
//! done in the background while no run is active), and each cell's patch of pixels becomes that
//! code's thumbnail. A live preview is then a copy of one patch per produced token. The real
//! decode happens once, when the run ends. No tensors here: only [`ImageDecoder`].

use crate::model::{ImageDecoder, RgbImage};

/// One `patch x patch` RGB thumbnail per code.
#[derive(Debug, Clone, PartialEq)]
pub struct CodePalette {
    /// Side of one code's patch in pixels.
    pub patch: usize,
    /// `codes * patch * patch * 3` bytes, code-major.
    pixels: Vec<u8>,
    /// Which codes have a thumbnail (all of them once built).
    known: Vec<bool>,
}

/// The colour of a cell not produced yet (and of a code without a thumbnail).
const BLANK: u8 = 236;

impl CodePalette {
    /// Decodes the codebook grid by grid; `keep_going` is asked before each decode and may
    /// wait (while a run needs the cores) or return false to give up (a new model).
    pub fn build(
        decoder: &dyn ImageDecoder,
        mut keep_going: impl FnMut() -> bool,
    ) -> anyhow::Result<Option<Self>> {
        let (h, w) = decoder.grid();
        let codes = decoder.codebook_size();
        let cells = h * w;
        anyhow::ensure!(cells > 0 && codes > 0, "empty grid or codebook");
        let mut palette: Option<Self> = None;
        for start in (0..codes).step_by(cells) {
            if !keep_going() {
                return Ok(None);
            }
            // Codes start.. in raster order; the tail of the last grid repeats code 0..
            let grid: Vec<u32> = (0..cells).map(|i| ((start + i) % codes) as u32).collect();
            let image = decoder.decode(&grid)?;
            anyhow::ensure!(
                image.width % w == 0
                    && image.height % h == 0
                    && image.width / w == image.height / h,
                "the decoder's {}x{} image does not tile a {h}x{w} grid",
                image.width,
                image.height
            );
            let p = palette.get_or_insert_with(|| {
                let patch = image.width / w;
                Self {
                    patch,
                    pixels: vec![BLANK; codes * patch * patch * 3],
                    known: vec![false; codes],
                }
            });
            for (i, &code) in grid.iter().enumerate().take(codes - start.min(codes)) {
                p.copy_from(&image, i / w, i % w, code as usize);
            }
        }
        Ok(palette)
    }

    fn copy_from(&mut self, image: &RgbImage, row: usize, col: usize, code: usize) {
        let p = self.patch;
        for y in 0..p {
            let src = ((row * p + y) * image.width + col * p) * 3;
            let dst = (code * p * p + y * p) * 3;
            self.pixels[dst..dst + p * 3].copy_from_slice(&image.pixels[src..src + p * 3]);
        }
        self.known[code] = true;
    }

    /// A blank image for an `h x w` grid.
    pub fn blank(&self, h: usize, w: usize) -> RgbImage {
        RgbImage {
            width: w * self.patch,
            height: h * self.patch,
            pixels: vec![BLANK; h * w * self.patch * self.patch * 3],
        }
    }

    /// Paints `code`'s thumbnail into `image` at cell `(row, col)`; codes outside the palette
    /// and cells outside the image are left as they are.
    pub fn paint(&self, image: &mut RgbImage, row: usize, col: usize, code: u32) {
        let p = self.patch;
        let code = code as usize;
        if !self.known.get(code).copied().unwrap_or(false)
            || (col + 1) * p > image.width
            || (row + 1) * p > image.height
        {
            return;
        }
        for y in 0..p {
            let dst = ((row * p + y) * image.width + col * p) * 3;
            let src = (code * p * p + y * p) * 3;
            image.pixels[dst..dst + p * 3].copy_from_slice(&self.pixels[src..src + p * 3]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose 2x2 patch of code c is filled with the value c.
    struct Flat {
        grid: (usize, usize),
        codes: usize,
    }

    impl ImageDecoder for Flat {
        fn decode(&self, tokens: &[u32]) -> anyhow::Result<RgbImage> {
            let (h, w) = self.grid;
            let mut px = vec![0u8; h * w * 4 * 3];
            for (i, &t) in tokens.iter().enumerate() {
                for y in 0..2 {
                    for x in 0..2 {
                        let o = (((i / w) * 2 + y) * w * 2 + (i % w) * 2 + x) * 3;
                        px[o..o + 3].fill(t as u8);
                    }
                }
            }
            Ok(RgbImage {
                width: w * 2,
                height: h * 2,
                pixels: px,
            })
        }
        fn grid(&self) -> (usize, usize) {
            self.grid
        }
        fn codebook_size(&self) -> usize {
            self.codes
        }
    }

    #[test]
    fn every_code_gets_its_own_patch() {
        let dec = Flat {
            grid: (2, 3),
            codes: 14,
        };
        let mut decodes = 0;
        let pal = CodePalette::build(&dec, || {
            decodes += 1;
            true
        })
        .ok()
        .flatten()
        .expect("palette");
        assert_eq!(decodes, 3, "ceil(14 / 6) grids");
        assert_eq!(pal.patch, 2);
        let mut img = pal.blank(2, 3);
        pal.paint(&mut img, 1, 2, 13);
        pal.paint(&mut img, 0, 0, 7);
        pal.paint(&mut img, 0, 1, 99); // unknown code: left blank
        let at = |x: usize, y: usize| img.pixels[(y * 6 + x) * 3];
        assert_eq!((at(4, 2), at(5, 3)), (13, 13));
        assert_eq!((at(0, 0), at(1, 1)), (7, 7));
        assert_eq!(at(2, 0), BLANK);
    }

    #[test]
    fn giving_up_returns_nothing() {
        let dec = Flat {
            grid: (1, 1),
            codes: 4,
        };
        let mut n = 0;
        let pal = CodePalette::build(&dec, || {
            n += 1;
            n < 3
        });
        assert!(matches!(pal, Ok(None)));
    }
}
