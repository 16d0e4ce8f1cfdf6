//! The report's HTML pages: the summary and per-class tables (page 1), then one row per image
//! with its scores, the differences to the first run, and its thumbnails. Tables scroll inside
//! their own box and thumbnails wrap, so no page runs off a narrow window.
use super::super::{EvalReport, Metrics};
use super::{page_file, panels, Row};
use std::fmt::Write as _;

const STYLE: &str = "body{font-family:sans-serif;font-size:13px;margin:12px;color:#222;max-width:100%}\n\
h1{font-size:20px} h2{font-size:16px}\n\
.scroll{overflow-x:auto;max-width:100%;margin-bottom:12px}\n\
table{border-collapse:collapse}\n\
.row{display:flex;flex-wrap:wrap;gap:32px;align-items:flex-start}\n\
td,th{border:1px solid #bbb;padding:1px 6px;text-align:right;vertical-align:top}\n\
td.l,th.l{text-align:left}\n\
td.neg{color:#b00} td.pos{color:#070}\n\
.sw{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:middle;margin-right:4px}\n\
.cells{display:flex;flex-wrap:wrap;gap:4px;max-width:680px}\n\
.cells img{display:block}\n\
nav{margin:8px 0} nav a,nav b{margin-right:6px}\n";

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// Percent-encodes a file name for a relative URL (ids may hold spaces, '#', '?').
fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.2}", v * 100.0)
    } else {
        "n/a".to_string()
    }
}

/// A difference in percentage points as a table cell, signed and coloured; `-` when undefined.
fn delta_cell(d: Option<f64>) -> String {
    match d.filter(|d| d.is_finite()) {
        Some(d) => {
            let class = if d < 0.0 {
                " class=\"neg\""
            } else if d > 0.0 {
                " class=\"pos\""
            } else {
                ""
            };
            format!("<td{class}>{:+.2}</td>", d * 100.0)
        }
        None => "<td>-</td>".to_string(),
    }
}

fn nav(s: &mut String, page: usize, pages: usize) {
    if pages <= 1 {
        return;
    }
    let _ = write!(s, "<nav>Pages:");
    for p in 1..=pages {
        if p == page {
            let _ = write!(s, " <b>{p}</b>");
        } else {
            let _ = write!(s, " <a href=\"{}\">{p}</a>", page_file(p));
        }
    }
    let _ = writeln!(s, "</nav>");
}

/// One page: `rows` are ranks `start + 1 ..` of `total` images.
#[allow(clippy::too_many_arguments)]
pub(super) fn page(
    runs: &[&EvalReport],
    palette: &[u8],
    with_photo: bool,
    ext: &str,
    rows: &[Row],
    start: usize,
    page: usize,
    pages: usize,
) -> String {
    let first = runs[0];
    let total = first.per_image.len();
    let mut s = String::new();
    let title = format!("clipmask eval: {}", first.config_name);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}{p}</title>\n<style>\n{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = html_escape(&title),
        p = if page > 1 { format!(" (page {page})") } else { String::new() },
    );
    nav(&mut s, page, pages);
    if page == 1 {
        summary(&mut s, runs, palette);
    }
    let preds = if runs.len() == 1 {
        "prediction".to_string()
    } else {
        (1..=runs.len()).map(|i| format!("#{i}")).collect::<Vec<_>>().join(" | ")
    };
    let layout = if with_photo { format!("photo | {preds} | ground truth") } else { format!("{preds} | ground truth") };
    let tie = if runs.len() > 1 { "; ties: largest difference between the runs first" } else { "" };
    let shown = if rows.is_empty() { "none".to_string() } else { format!("{} to {}", start + 1, start + rows.len()) };
    let _ = write!(
        s,
        "<h2>Images, worst first ({shown} of {total})</h2>\n<p>Ordered by the first run's image mIoU, lowest first{tie}. \
         Pictures: {layout}; white = 255 (ignore); click one for full size. Only the first images of this order \
         have pictures (eval --report-images N); index.json lists every image's page and scores.</p>\n\
         <div class=\"scroll\"><table>\n<tr><th>#</th><th class=\"l\">id</th>"
    );
    for i in 0..runs.len() {
        if runs.len() == 1 {
            let _ = write!(s, "<th>mIoU %</th>");
        } else {
            let _ = write!(s, "<th>mIoU % #{}</th>", i + 1);
            if i > 0 {
                let _ = write!(s, "<th>Δ #{}</th>", i + 1);
            }
        }
    }
    let _ = writeln!(
        s,
        "<th>pixel acc %{}</th><th class=\"l\">{layout}</th></tr>",
        if runs.len() > 1 { " #1" } else { "" }
    );
    for (k, row) in rows.iter().enumerate() {
        let i = row.index;
        let _ = write!(s, "<tr><td>{}</td><td class=\"l\">{}</td>", start + k + 1, html_escape(row.id));
        let base = first.per_image[i].miou[first.best];
        for (r_i, r) in runs.iter().enumerate() {
            let v = r.per_image[i].miou[r.best];
            let _ = write!(s, "<td>{}</td>", pct(v));
            if r_i > 0 {
                s.push_str(&delta_cell(Some(v - base)));
            }
        }
        let _ = write!(s, "<td>{}</td>", pct(first.per_image[i].pixel_accuracy[first.best]));
        match &row.drawn {
            Some(d) => {
                let file = url_component(row.id);
                let _ = write!(s, "<td class=\"l\"><div class=\"cells\">");
                for p in 0..d.panels {
                    let _ = write!(
                        s,
                        "<a href=\"images/{file}.{ext}\"><img loading=\"lazy\" src=\"thumbs/{}\" alt=\"{}\" width=\"{}\" height=\"{}\"></a>",
                        url_component(&panels::thumb_name(row.id, p, ext)),
                        html_escape(row.id),
                        d.thumb.0,
                        d.thumb.1
                    );
                }
                let _ = writeln!(s, "</div></td></tr>");
            }
            None => {
                let _ = writeln!(s, "<td class=\"l\">-</td></tr>");
            }
        }
    }
    let _ = writeln!(s, "</table></div>");
    nav(&mut s, page, pages);
    let _ = writeln!(s, "</body></html>");
    s
}

/// The summary and per-class tables, side by side (wrapping on a narrow window), with the
/// differences to the first run when several are compared.
fn summary(s: &mut String, runs: &[&EvalReport], palette: &[u8]) {
    let first = runs[0];
    let several = runs.len() > 1;
    for r in runs {
        if let Some(a) = r.variants[r.best].alpha {
            let _ = writeln!(
                s,
                "<p>{}: CAM labels ({}) at the best alpha = {a}.</p>",
                html_escape(&r.source.display().to_string()),
                r.cam_key.map(|k| k.name()).unwrap_or("")
            );
        }
    }
    let _ = writeln!(s, "<div class=\"row\"><div class=\"scroll\"><h2>Summary</h2>\n<table>");
    if several {
        let _ = write!(s, "<tr><th class=\"l\"></th>");
        for (i, r) in runs.iter().enumerate() {
            let _ = write!(s, "<th title=\"{}\">#{}</th>", html_escape(&r.source.display().to_string()), i + 1);
        }
        let _ = writeln!(s, "</tr>");
    }
    type Line = (&'static str, fn(&Metrics) -> f64);
    let lines: [Line; 6] = [
        ("mIoU", |m| m.miou),
        ("pixel accuracy", |m| m.pixel_accuracy),
        ("mean accuracy", |m| m.mean_accuracy),
        ("frequency-weighted IoU", |m| m.fw_iou),
        ("ignored fraction (predicted 255)", |m| m.ignored_fraction),
        ("mIoU on kept pixels", |m| m.miou_kept),
    ];
    let base = first.best_metrics();
    for (k, f) in lines {
        let _ = write!(s, "<tr><th class=\"l\">{k}</th>");
        for r in runs {
            let _ = write!(s, "<td>{}</td>", pct(f(r.best_metrics())));
        }
        let _ = writeln!(s, "</tr>");
        if several && k == "mIoU" {
            let _ = write!(s, "<tr><th class=\"l\">Δ mIoU vs #1</th><td>-</td>");
            for r in &runs[1..] {
                s.push_str(&delta_cell(Some(r.best_metrics().miou - base.miou)));
            }
            let _ = writeln!(s, "</tr>");
        }
    }
    let _ = writeln!(s, "<tr><th class=\"l\">images</th><td>{}</td></tr>", first.images);
    let _ = writeln!(s, "<tr><th class=\"l\">skipped</th><td>{}</td></tr>", first.skipped.len());
    if several {
        for (i, r) in runs.iter().enumerate() {
            let _ = writeln!(
                s,
                "<tr><th class=\"l\">#{}</th><td class=\"l\" colspan=\"{}\">{}</td></tr>",
                i + 1,
                runs.len(),
                html_escape(&r.source.display().to_string())
            );
        }
    }
    let _ =
        write!(s, "</table></div>\n<div class=\"scroll\"><h2>Per class</h2>\n<table>\n<tr><th class=\"l\">class</th>");
    if several {
        for i in 0..runs.len() {
            let _ = write!(s, "<th>IoU % #{}</th>", i + 1);
            if i > 0 {
                let _ = write!(s, "<th>Δ #{}</th>", i + 1);
            }
        }
        let _ = writeln!(s, "</tr>");
    } else {
        let _ = writeln!(s, "<th>IoU %</th><th>acc %</th><th>gt px</th><th>pred px</th><th>ignored px</th></tr>");
    }
    for (i, name) in first.class_names.iter().enumerate() {
        let col = &palette[i * 3..i * 3 + 3];
        let _ = write!(
            s,
            "<tr><td class=\"l\"><span class=\"sw\" style=\"background:rgb({},{},{})\"></span>{}</td>",
            col[0],
            col[1],
            col[2],
            html_escape(name)
        );
        let dash = || "-".to_string();
        if several {
            let b = base.per_class[i].iou;
            for (k, r) in runs.iter().enumerate() {
                let iou = r.best_metrics().per_class[i].iou;
                let _ = write!(s, "<td>{}</td>", iou.map(pct).unwrap_or_else(dash));
                if k > 0 {
                    s.push_str(&delta_cell(iou.zip(b).map(|(a, b)| a - b)));
                }
            }
            let _ = writeln!(s, "</tr>");
        } else {
            let c = &first.best_metrics().per_class[i];
            let _ = writeln!(
                s,
                "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                c.iou.map(pct).unwrap_or_else(dash),
                c.accuracy.map(pct).unwrap_or_else(dash),
                c.gt_pixels,
                c.pred_pixels,
                c.ignored_pixels
            );
        }
    }
    let _ = writeln!(s, "</table></div></div>");
}
