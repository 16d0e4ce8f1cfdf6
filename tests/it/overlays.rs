//! The overlays' legend on a hand-made label map: one swatch of the exact palette colour per
//! class present (ascending id) with its name beside it, none for absent classes, and the rest
//! of the overlay exactly the blend of the photo with the label colours.
use crate::support::*;
use clipmask::outputs::overlay_image;

/// The overlay's blend, computed here: each non-background, non-ignore pixel becomes
/// round(photo (1 - 0.55) + colour 0.55).
fn blended(photo: &image::RgbImage, labels: &[u8], palette: &[u8]) -> image::RgbImage {
    let mut out = photo.clone();
    for (px, &l) in out.pixels_mut().zip(labels) {
        if l == 0 || l == 255 {
            continue;
        }
        for ch in 0..3 {
            let v = px.0[ch] as f64 * 0.45 + palette[l as usize * 3 + ch] as f64 * 0.55;
            px.0[ch] = v.round() as u8;
        }
    }
    out
}

#[test]
fn the_legend_shows_the_classes_present_and_leaves_the_rest_of_the_overlay_alone() {
    let (w, h) = (160u32, 120u32);
    let photo = synthetic_image(w, h, 9);
    // Person (15) on the right, bird (3) at the bottom, an ignore band, background elsewhere.
    let mut labels = vec![0u8; (w * h) as usize];
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) as usize;
            if x >= 100 {
                labels[i] = 15;
            } else if y >= 90 {
                labels[i] = 3;
            } else if (60..64).contains(&y) {
                labels[i] = 255;
            }
        }
    }
    let cfg = voc();
    let palette = cfg.png_palette();
    let names: Vec<String> = cfg.class_names().iter().map(|s| s.to_string()).collect();
    let out = overlay_image(&photo, &labels, &palette, 0.55, &names);
    let want = blended(&photo, &labels, &palette);

    // The legend is a box in the top-left corner: every pixel that differs from the blend lies
    // in it, and everything outside it is the blend exactly.
    let differs: Vec<(u32, u32)> =
        out.enumerate_pixels().filter(|(x, y, p)| **p != *want.get_pixel(*x, *y)).map(|(x, y, _)| (x, y)).collect();
    assert!(!differs.is_empty(), "no legend drawn");
    let bx = differs.iter().map(|p| p.0).max().unwrap() + 1;
    let by = differs.iter().map(|p| p.1).max().unwrap() + 1;
    assert!(bx < w / 2 && by < h / 2, "legend box {bx}x{by} is not small");
    for (x, y, p) in out.enumerate_pixels() {
        if x >= bx || y >= by {
            assert_eq!(p, want.get_pixel(x, y), "({x}, {y}) outside the legend changed");
        }
    }
    // Inside it: a 10x10 swatch of each present class's palette colour, bird above person.
    let colour = |l: usize| image::Rgb([palette[l * 3], palette[l * 3 + 1], palette[l * 3 + 2]]);
    let swatch = |l: usize| {
        let px: Vec<(u32, u32)> = (0..by)
            .flat_map(|y| (0..bx).map(move |x| (x, y)))
            .filter(|&(x, y)| *out.get_pixel(x, y) == colour(l))
            .collect();
        px
    };
    let mut tops = Vec::new();
    for l in [3usize, 15] {
        let px = swatch(l);
        assert_eq!(px.len(), 100, "class {l}: swatch pixels");
        let (x0, y0) = (px.iter().map(|p| p.0).min().unwrap(), px.iter().map(|p| p.1).min().unwrap());
        assert!(px.iter().all(|&(x, y)| x - x0 < 10 && y - y0 < 10), "class {l}: not one 10x10 square");
        // Its name beside it: black glyph pixels to the right of the swatch, in its row.
        let ink = (x0 + 10..bx).flat_map(|x| (y0..y0 + 10).map(move |y| (x, y)));
        assert!(ink.filter(|&(x, y)| out.get_pixel(x, y).0 == [0, 0, 0]).count() > 20, "class {l}: no name");
        tops.push(y0);
    }
    assert!(tops[0] < tops[1], "rows in ascending class id");
    // No swatch for the absent classes (background's black is the text's colour).
    for l in (1..21).filter(|l| ![3, 15].contains(l)) {
        assert_eq!(swatch(l).len(), 0, "class {l} is absent but has a swatch");
    }
    // "person" is wider than "bird": the box fits the longest name, 8 px a character.
    assert!(bx >= 3 + 10 + 4 + 8 * 6, "box {bx} px wide");

    // A label map with no foreground class: no legend, the blend (here the photo) exactly.
    let none = vec![0u8; (w * h) as usize];
    assert_eq!(overlay_image(&photo, &none, &palette, 0.55, &names), photo);
}
