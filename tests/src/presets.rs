//! The full-size presets against `reference_models.json`: exact parameter counts, MACs at 224×224
//! within 1%, and the state
//! dict (after the key mapping used for loading) has exactly the reference's keys and shapes.

use std::collections::BTreeMap;

use pf_models::weights::{is_ignored_key, num_parameters, state_dict};
use pf_models::ModelName;

use crate::common::{fixtures_dir, Cpu};

fn reference() -> serde_json::Value {
    let path = fixtures_dir().join("reference_models.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference_models.json")).expect("json")
}

#[test]
fn every_preset_has_the_reference_state_dict_parameters_and_macs() {
    let reference = reference();
    let models = reference["models"].as_object().expect("models");
    let names: Vec<&str> = ModelName::ALL.iter().map(|m| m.as_str()).collect();
    let mut listed: Vec<&str> = models.keys().map(String::as_str).collect();
    listed.sort();
    let mut ours = names.clone();
    ours.sort();
    assert_eq!(ours, listed, "the presets are exactly the reference's named models");

    for name in ModelName::ALL {
        let expected = &models[name.as_str()];
        let model = name.config().init::<Cpu>(&Default::default()).expect("preset builds");
        assert_eq!(num_parameters(&model) as u64, expected["params"].as_u64().expect("params"), "{name}: parameter count");
        let macs = model.cost([224, 224]).expect("224 fits every preset").macs as f64;
        let want = expected["macs_224"].as_f64().expect("macs_224");
        assert!((macs - want).abs() <= 0.01 * want, "{name}: {macs} MACs, reference {want}");

        let want: BTreeMap<String, Vec<usize>> = expected["state_dict"]
            .as_object()
            .expect("state_dict")
            .iter()
            .filter(|(k, _)| !is_ignored_key(k))
            .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).expect("shape")))
            .collect();
        let have: BTreeMap<String, Vec<usize>> = state_dict(&model).into_iter().map(|e| (e.key, e.shape)).collect();
        let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
        let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{name}: missing {missing:?}, extra {extra:?}");
        for (key, shape) in &want {
            assert_eq!(&have[key], shape, "{name}: shape of {key}");
        }
    }
}

#[test]
fn unknown_names_fail_with_the_known_ones() {
    let err = "resnet51".parse::<ModelName>().unwrap_err().to_string();
    assert!(err.contains("resnet51") && err.contains("resnet50_hybrid") && err.contains("pit_s"), "{err}");
}

#[test]
fn presets_override_classes_and_drop_path() {
    let config = ModelName::VitSMax.config().with_num_classes(10).with_drop_path_rate(0.1).expect("vit has drop-path");
    assert_eq!(config.num_classes(), 10);
    let pf_models::ModelConfig::Vit(vit) = &config else { panic!("vit") };
    assert_eq!(vit.drop_path_rate, 0.1);
    assert!((vit.drop_path(11) - 0.1).abs() < 1e-12 && vit.drop_path(0) == 0.0);
    assert!(ModelName::Resnet50Max.config().with_drop_path_rate(0.1).is_err(), "resnet has no drop-path");
    assert!(ModelName::PitSMax.config().with_drop_path_rate(1.5).is_err());
}
