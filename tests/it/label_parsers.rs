//! Property tests of the label-file and annotation parsers: garbage never panics (a parser
//! returns an error or a value), and well-formed inputs round-trip. The seeded generator of
//! `support` makes the inputs, so a failure is reproducible from the printed case number.
use crate::support::{rng, Rng, StdRng};
use clipmask::config::DatasetConfig;
use clipmask::datasets::{parse_labels_text, parse_voc_xml, read_coco_instances, read_labels_json, RawLabels};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// An element of `xs` (not empty), uniformly.
fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

/// Characters that matter to the parsers, plus some that should not.
const ALPHABET: &[char] = &[
    'a', 'b', 'z', 'A', '0', '9', '_', '-', '.', ' ', ' ', '\t', '\t', '\n', '\n', '\r', ',', ',', '#', '<', '>', '/',
    '&', ';', '"', '\'', '=', '?', '!', '[', ']', '{', '}', ':', '\\', 'é', '中', '\u{feff}', '\u{0}', '\u{85}',
    '\u{2028}', '🐕',
];

fn random_string(rng: &mut StdRng, max_len: usize) -> String {
    let n = rng.random_range(0..=max_len);
    (0..n).map(|_| pick(rng, ALPHABET)).collect()
}

/// Byte-level mutations of a valid input: flips, deletions, insertions, truncation, duplication.
fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        if v.is_empty() {
            v.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..v.len());
        match rng.random_range(0..7) {
            0 => v[i] ^= 1 << rng.random_range(0..8),
            1 => {
                v.remove(i);
            }
            2 => v.insert(i, pick(rng, b"<>/\"{}[],:\t\n#&0-e.")),
            3 => v.truncate(i),
            4 => {
                let j = (i + rng.random_range(0..40)).min(v.len());
                let chunk = v[i..j].to_vec();
                v.splice(i..i, chunk);
            }
            5 => v[i] = rng.random(),
            _ => {
                let j = (i + rng.random_range(0..40)).min(v.len());
                v.drain(i..j);
            }
        }
    }
    v
}

/// Runs `f` on every case, collecting panics instead of stopping at the first.
fn no_panics<T>(what: &str, cases: impl IntoIterator<Item = T>, mut f: impl FnMut(&T)) -> usize
where
    T: std::fmt::Debug,
{
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut panics = Vec::new();
    let mut n = 0;
    for (i, c) in cases.into_iter().enumerate() {
        n += 1;
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(&c))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panics.push(format!("case {i}: {msg}; input {:?}", format!("{c:?}").chars().take(300).collect::<String>()));
        }
    }
    std::panic::set_hook(prev);
    assert!(
        panics.is_empty(),
        "{what}: {} of {n} inputs panicked:\n{}",
        panics.len(),
        panics.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    n
}

// ---------------------------------------------------------------------------------------------
// Text labels
// ---------------------------------------------------------------------------------------------

const VALID_TEXT: &str =
    "# VOC labels\n2007_000032\taeroplane,person\n2007_000039\ttvmonitor\r\n\n2007_000063\tdog, chair ,\n";

/// What any successful parse must satisfy.
fn check_text_result(input: &str, r: &anyhow::Result<RawLabels>) {
    if let Ok(map) = r {
        for (id, labels) in map {
            assert!(!id.contains('\t') && !id.contains('\n'), "id {id:?} from {input:?}");
            assert_eq!(id.trim(), id, "id not trimmed: {id:?}");
            for l in labels {
                assert!(!l.is_empty() && !l.contains(',') && !l.contains('\n'), "label {l:?} from {input:?}");
                assert_eq!(l.trim(), l, "label not trimmed: {l:?}");
            }
        }
    }
}

#[test]
fn labels_text_parser_never_panics_on_garbage() {
    let mut rng = rng(1);
    let mut cases: Vec<String> = (0..3000).map(|_| random_string(&mut rng, 120)).collect();
    cases.extend((0..2000).map(|_| String::from_utf8_lossy(&mutate(&mut rng, VALID_TEXT.as_bytes())).into_owned()));
    cases.extend([
        "".into(),
        "\t".into(),
        "\t\t\t".into(),
        ",".into(),
        "#\t".into(),
        "\u{feff}id\tdog".into(),
        "id\t".into(),
        "id\t,,,".into(),
        "\r\n\r\n".into(),
    ]);
    cases.push(format!("{}\t{}", "x".repeat(1 << 20), "dog,".repeat(1 << 16)));
    let n = no_panics("parse_labels_text", cases, |s| {
        let r = parse_labels_text(s, "fuzz.txt");
        check_text_result(s, &r);
        if let Err(e) = &r {
            let msg = format!("{e:#}");
            assert!(msg.starts_with("fuzz.txt:"), "error names the origin and line: {msg}");
        }
    });
    eprintln!("{n} text inputs");
}

#[test]
fn labels_text_round_trips() {
    let mut rng = rng(2);
    let id_chars: Vec<char> = "abcXYZ0123456789_-.éü中 ".chars().collect();
    let label_chars: Vec<char> = "abcdefghijklmnopqrstuvwxyz ()'/éñ中".chars().collect();
    let word = |rng: &mut StdRng, chars: &[char], max: usize| -> String {
        loop {
            let n = rng.random_range(1..=max);
            let s: String = (0..n).map(|_| pick(rng, chars)).collect();
            let s = s.trim().to_string();
            if !s.is_empty() && !s.starts_with('#') {
                return s;
            }
        }
    };
    for case in 0..500 {
        let mut map = RawLabels::new();
        for _ in 0..rng.random_range(0..30) {
            let id = word(&mut rng, &id_chars, 16);
            let labels: Vec<String> = (0..rng.random_range(0..5)).map(|_| word(&mut rng, &label_chars, 20)).collect();
            map.insert(id, labels);
        }
        // Written the documented way, with the variations a person or a script produces.
        let mut text = String::new();
        for (id, labels) in &map {
            let sep = if rng.random() { "," } else { ", " };
            text += &format!("{id}\t{}{}", labels.join(sep), if rng.random_ratio(1, 4) { "\r\n" } else { "\n" });
            if rng.random_ratio(1, 5) {
                text += "\n# a comment\n";
            }
        }
        let back = parse_labels_text(&text, "rt.txt").unwrap_or_else(|e| panic!("case {case}: {e:#}\n{text:?}"));
        assert_eq!(back, map, "case {case}: round trip of {text:?}");

        // The same map through the JSON form.
        let tmp = tempfile::NamedTempFile::with_suffix(".json").unwrap();
        std::fs::write(tmp.path(), serde_json::to_string(&map).unwrap()).unwrap();
        assert_eq!(read_labels_json(tmp.path()).unwrap(), map, "case {case}: JSON round trip");
        // And through read_labels_file, which picks the parser by extension.
        let t2 = tempfile::NamedTempFile::with_suffix(".txt").unwrap();
        std::fs::write(t2.path(), &text).unwrap();
        assert_eq!(clipmask::datasets::read_labels_file(t2.path()).unwrap(), map);
    }
}

// ---------------------------------------------------------------------------------------------
// VOC XML
// ---------------------------------------------------------------------------------------------

const VALID_XML: &str = r#"<?xml version="1.0"?>
<annotation>
	<folder>VOC2012</folder>
	<filename>2007_000032.jpg</filename>
	<size><width>500</width><height>281</height><depth>3</depth></size>
	<object>
		<name>aeroplane</name>
		<pose>Frontal</pose>
		<truncated>0</truncated>
		<bndbox><xmin>104</xmin><ymin>78</ymin><xmax>375</xmax><ymax>183</ymax></bndbox>
	</object>
	<object>
		<name>person</name>
		<part><name>head</name><bndbox><xmin>1</xmin></bndbox></part>
	</object>
</annotation>
"#;

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[test]
fn voc_xml_parser_never_panics_on_garbage() {
    assert_eq!(parse_voc_xml(VALID_XML).unwrap(), vec!["aeroplane", "person"]);
    let mut rng = rng(3);
    let mut cases: Vec<String> = (0..2000).map(|_| random_string(&mut rng, 200)).collect();
    cases.extend((0..3000).map(|_| String::from_utf8_lossy(&mutate(&mut rng, VALID_XML.as_bytes())).into_owned()));
    // Adversarial shapes: deep nesting, entity expansion, DTDs, huge names, empty names.
    cases.push(format!("{}{}", "<object>".repeat(20_000), "</object>".repeat(20_000)));
    cases.push(format!("<a>{}<object><name>dog</name></object>{}</a>", "<b>".repeat(5000), "</b>".repeat(5000)));
    cases.push(r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;"><!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;"><!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;"><!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;"><!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;"><!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;"><!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]><annotation><object><name>&lol9;</name></object></annotation>"#.into());
    cases.push(r#"<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><annotation><object><name>&e;</name></object></annotation>"#.into());
    cases.push(format!("<annotation><object><name>{}</name></object></annotation>", "x".repeat(1 << 20)));
    cases.push("<annotation><object><name></name></object><object><name/></object><object/></annotation>".into());
    cases.push("<annotation><object><name><![CDATA[dog]]></name></object></annotation>".into());
    cases.push("\u{feff}<annotation><object><name>dog</name></object></annotation>".into());
    let t = std::time::Instant::now();
    let n = no_panics("parse_voc_xml", cases, |s| {
        let t = std::time::Instant::now();
        if let Ok(names) = parse_voc_xml(s) {
            for n in &names {
                assert_eq!(n.trim(), n, "names are trimmed");
            }
        }
        assert!(t.elapsed().as_secs_f64() < 5.0, "one parse took {:?}", t.elapsed());
    });
    eprintln!("{n} XML inputs in {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn voc_xml_round_trips_object_names() {
    let mut rng = rng(4);
    let chars: Vec<char> = "abcdefghijklmnopqrstuvwxyz <>&'\"éñ中-_".chars().collect();
    for case in 0..500 {
        let names: Vec<String> = (0..rng.random_range(0..8))
            .map(|_| loop {
                let s: String = (0..rng.random_range(1..=15)).map(|_| pick(&mut rng, &chars)).collect();
                if !s.trim().is_empty() {
                    break s.trim().to_string();
                }
            })
            .collect();
        let mut xml = String::from("<annotation><filename>x.jpg</filename>");
        for n in &names {
            let pad = if rng.random() { "\n\t\t" } else { "" };
            xml += &format!("<object><name>{pad}{}{pad}</name><part><name>hand</name></part><bndbox><xmin>1</xmin></bndbox></object>", xml_escape(n));
        }
        xml += "</annotation>";
        assert_eq!(parse_voc_xml(&xml).unwrap(), names, "case {case}: {xml}");
    }
}

// ---------------------------------------------------------------------------------------------
// JSON labels and COCO instances (through files)
// ---------------------------------------------------------------------------------------------

#[test]
fn labels_json_reader_never_panics_on_garbage() {
    let valid = br#"{"2007_000032": ["aeroplane", "person"], "2007_000039": ["tvmonitor"], "x": []}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.json");
    let mut rng = rng(5);
    let mut cases: Vec<Vec<u8>> = (0..1500).map(|_| mutate(&mut rng, valid)).collect();
    cases.extend((0..500).map(|_| random_string(&mut rng, 80).into_bytes()));
    cases.extend((0..200).map(|_| (0..rng.random_range(0..64)).map(|_| rng.random()).collect()));
    cases.push(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes());
    cases.push(format!("{{\"a\": {}{}}}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    cases.push(b"\xef\xbb\xbf{\"a\": [\"dog\"]}".to_vec());
    cases.push(b"{\"a\": [\"dog\"], \"a\": [\"cat\"]}".to_vec());
    cases.push(b"{\"a\": \"dog\"}".to_vec());
    cases.push(b"{\"a\": [1, 2]}".to_vec());
    cases.push(b"[]".to_vec());
    cases.push(b"null".to_vec());
    let n = no_panics("read_labels_json", cases, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Err(e) = read_labels_json(&path) {
            let msg = format!("{e:#}");
            assert!(msg.contains("labels.json"), "error names the file: {msg}");
        }
    });
    eprintln!("{n} JSON inputs");
}

fn small_coco() -> String {
    let gaps = [12u64, 26, 29, 30, 45, 66, 68, 69, 71, 83];
    let cats: Vec<String> =
        (1..=90u64).filter(|i| !gaps.contains(i)).map(|i| format!(r#"{{"id":{i},"name":"c{i}"}}"#)).collect();
    format!(
        r#"{{"images":[{{"id":1,"file_name":"COCO_val2014_000000000001.jpg"}},{{"id":2,"file_name":"b/c.d.png"}},{{"id":3,"file_name":"x.jpg"}}],"annotations":[{{"image_id":1,"category_id":1,"segmentation":[[1,2,3,4]]}},{{"image_id":2,"category_id":90}},{{"image_id":1,"category_id":84}}],"categories":[{}]}}"#,
        cats.join(",")
    )
}

#[test]
fn coco_reader_never_panics_on_garbage() {
    let cfg = DatasetConfig::resolve("coco14").unwrap();
    let valid = small_coco();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.json");
    std::fs::write(&path, &valid).unwrap();
    let (labels, skipped) = read_coco_instances(&path, &cfg).unwrap();
    assert_eq!(skipped, 1);
    let names = cfg.class_names();
    assert_eq!(labels["COCO_val2014_000000000001"], vec![names[0].to_string(), names[73].to_string()]);
    assert_eq!(labels["c.d"], vec![names[79].to_string()]);

    let mut rng = rng(6);
    let mut cases: Vec<Vec<u8>> = (0..1500).map(|_| mutate(&mut rng, valid.as_bytes())).collect();
    // Structural oddities in otherwise valid JSON.
    for (from, to) in [
        (r#""category_id":90"#, r#""category_id":91"#),
        (r#""category_id":90"#, r#""category_id":-1"#),
        (r#""category_id":90"#, r#""category_id":1e30"#),
        (r#""category_id":90"#, r#""category_id":18446744073709551615"#),
        (r#""category_id":90"#, r#""category_id":"90""#),
        (r#""image_id":2"#, r#""image_id":999"#),
        (r#""file_name":"x.jpg""#, r#""file_name":"""#),
        (r#""file_name":"x.jpg""#, r#""file_name":"/""#),
        (r#""file_name":"x.jpg""#, r#""file_name":"..""#),
        (r#"{"id":3,"#, r#"{"id":1,"#),
        (r#"{"id":90,"name":"c90"}"#, r#"{"id":90,"name":"c90"},{"id":90,"name":"again"}"#),
        (r#",{"id":90,"name":"c90"}"#, ""),
        (r#""images":["#, r#""images":null,"x":["#),
    ] {
        assert!(valid.contains(from), "{from}");
        cases.push(valid.replacen(from, to, 1).into_bytes());
    }
    cases.push(b"".to_vec());
    cases.push(b"{}".to_vec());
    cases.push(br#"{"images":[],"annotations":[],"categories":[]}"#.to_vec());
    let mut oks = 0;
    let n = no_panics("read_coco_instances", cases, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        match read_coco_instances(&path, &cfg) {
            Ok((labels, _)) => {
                oks += 1;
                for names in labels.values() {
                    assert!(names.iter().all(|n| cfg.class_index(n).is_some()), "labels are config class names");
                }
            }
            Err(e) => assert!(format!("{e:#}").contains("instances.json"), "error names the file: {e:#}"),
        }
    });
    eprintln!("{n} COCO inputs, {oks} parsed");
}
