use clipmask::crf::tensor::{self, TensorRun};
use clipmask::crf::CrfParams;
fn main() {
    let threads: i32 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(0);
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let (w, h, l) = (500usize, 375usize, 21usize);
    let n = w * h;
    let img: Vec<u8> = (0..n * 3).map(|i| ((i * 7919 + i / 1500 * 13) % 256) as u8).collect();
    let probs: Vec<f32> = (0..n * l).map(|i| ((i * 31) % 997) as f32 / 997.0).collect();
    for it in [0usize, 1, 10] {
        let p = CrfParams { iterations: it, ..CrfParams::default() };
        let t = std::time::Instant::now();
        let q =
            tensor::dense_crf(&img, w, h, &probs, l, &p, TensorRun { device: tch::Device::Cpu, stop: None }).unwrap();
        let _ = tensor::labels_from_marginals(&q, &(0..21).collect::<Vec<u8>>(), 0.95).unwrap();
        println!("threads {} iterations {it}: {:?}", tch::get_num_threads(), t.elapsed());
    }
    let t = std::time::Instant::now();
    clipmask::crf::dense_crf(&img, w, h, &probs, l, &CrfParams::default()).unwrap();
    println!("cpu crf {:?}", t.elapsed());
}
