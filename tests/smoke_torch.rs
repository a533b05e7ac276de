//! libtorch is linked and works: a TorchScript module traced from a `tch::nn`
//! model, saved and loaded back, gives the model's outputs.

use tch::nn::{self, Module};
use tch::{CModule, Device, Kind, Tensor};

#[test]
fn traced_module_round_trips_through_a_file() {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "l1", 28, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "l2", 16, 2, Default::default()))
        .add_fn(|x| x.softmax(-1, Kind::Float));
    vs.freeze();
    let example = Tensor::randn([4, 28], (Kind::Float, Device::Cpu));
    let traced = CModule::create_by_tracing("Smoke", "forward", &[example.shallow_clone()], &mut |inputs| {
        vec![net.forward(&inputs[0])]
    })
    .expect("trace");
    let dir = std::env::temp_dir().join(format!("fraudstream-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.pt");
    traced.save(&path).expect("save");

    let mut loaded = CModule::load(&path).expect("load");
    loaded.set_eval();
    let input = Tensor::randn([64, 28], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| net.forward(&input));
    let actual = tch::no_grad(|| loaded.forward_ts(&[&input])).expect("forward");
    assert_eq!(actual.size(), vec![64, 2]);
    let diff = (&actual - &expected).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "loaded module differs by {diff}");
    let sums = actual.sum_dim_intlist([1].as_slice(), false, Kind::Float);
    assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5);
    std::fs::remove_dir_all(&dir).ok();
}
