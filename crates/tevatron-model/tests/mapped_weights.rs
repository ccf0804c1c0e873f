//! Weights that stay memory-mapped (`tevatron_model::mapped`), in a test binary that installs
//! `MappedAlloc` as the `tevatron` binary does: the loaded tensors use the file's pages as their
//! buffers, hold the file mapped while any of them lives, and unmap it when the last one goes;
//! a tensor the mapping cannot serve in place (misaligned) is copied; a buffer that grows
//! moves to the heap. The parity test binaries install it too, so every transformers and PEFT
//! comparison there runs on mapped weights.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Mutex;

use candle_core::{Device, Storage, Tensor};
use tevatron_model::mapped::{self, MappedAlloc, MappedFile};
use tevatron_model::testing::{load_tiny, max_abs_diff, tiny_dir};
use tevatron_model::{weights, EncoderOptions, Pooling};

#[global_allocator]
static ALLOC: MappedAlloc = MappedAlloc;

/// The mapped-bytes count is process-wide: these tests take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn buffer_address(t: &Tensor) -> *const u8 {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => match cpu {
            candle_core::CpuStorage::F32(v) => v.as_ptr().cast(),
            candle_core::CpuStorage::U8(v) => v.as_ptr(),
            _ => panic!("a tensor of an unexpected dtype"),
        },
        _ => panic!("not a CPU tensor"),
    }
}

#[test]
fn loaded_weights_use_the_mapped_file_until_the_model_is_dropped() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(mapped::available());
    let path = tiny_dir("qwen2").join("model.safetensors");
    let copied = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let loaded = weights::load(&tiny_dir("qwen2"), &[], &Device::Cpu).unwrap();
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    assert_eq!(mapped::mapped_bytes(), file_len);
    assert_eq!(loaded.len(), copied.len());
    for (name, t) in &loaded {
        assert!(mapped::contains(buffer_address(t)), "{name} was copied");
        assert_eq!(max_abs_diff(t, &copied[name]).unwrap(), 0.0, "{name}");
    }
    // One tensor kept alive keeps the file mapped; the last one unmaps it.
    let kept = loaded["embed_tokens.weight"].clone();
    drop(loaded);
    assert_eq!(mapped::mapped_bytes(), file_len);
    drop(kept);
    assert_eq!(mapped::mapped_bytes(), 0);

    // An encoder over mapped weights gives the same embeddings as one whose weights were
    // copied into memory (here: made trainable, which copies every weight into a variable).
    let text = tevatron_model::TextOptions { max_len: 16, ..Default::default() };
    let texts = ["a mapped model".to_string(), "encodes like a copied one".to_string()];
    let frozen = load_tiny("qwen2", Pooling::Last, EncoderOptions::default());
    assert_eq!(mapped::mapped_bytes(), file_len);
    let opts = EncoderOptions { trainable: true, ..EncoderOptions::default() };
    let copy = load_tiny("qwen2", Pooling::Last, opts);
    let a = frozen.embed(&texts, &text, 8).unwrap();
    let b = copy.embed(&texts, &text, 8).unwrap();
    assert_eq!(a, b);
    drop((frozen, copy));
    assert_eq!(mapped::mapped_bytes(), 0);
}

/// A safetensors file whose header length puts the data at an odd offset: an F32 tensor
/// there cannot be a `Vec<f32>` over the mapping and is copied; a U8 tensor can.
#[test]
fn a_misaligned_tensor_is_copied_and_an_aligned_one_is_mapped() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let values = [1.5f32, -2.0, 3.25];
    let mut header = String::from(
        r#"{"bytes":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"w":{"dtype":"F32","shape":[3],"data_offsets":[3,15]}}"#,
    );
    while (8 + header.len()) % 4 != 2 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend([7u8, 8, 9]);
    file.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(dir.path().join("model.safetensors"), file).unwrap();

    let loaded = weights::load(dir.path(), &[], &Device::Cpu).unwrap();
    assert!(mapped::contains(buffer_address(&loaded["bytes"])));
    assert!(!mapped::contains(buffer_address(&loaded["w"])));
    assert_eq!(loaded["bytes"].to_vec1::<u8>().unwrap(), [7, 8, 9]);
    assert_eq!(loaded["w"].to_vec1::<f32>().unwrap(), values);
    drop(loaded);
    assert_eq!(mapped::mapped_bytes(), 0);
}

#[test]
fn a_mapped_buffer_that_grows_moves_to_the_heap() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = tiny_dir("qwen2").join("model.safetensors");
    let file = std::fs::File::open(&path).unwrap();
    let map = MappedFile::open(&file).unwrap().unwrap();
    let mut head: Vec<u8> = map.buffer(0..8).unwrap();
    assert!(mapped::contains(head.as_ptr()));
    let want = std::fs::read(&path).unwrap()[..8].to_vec();
    assert_eq!(head, want);
    drop(map);
    assert!(mapped::mapped_bytes() > 0, "the buffer still holds the file");
    head.push(1);
    assert!(!mapped::contains(head.as_ptr()));
    assert_eq!(head[..8], want[..]);
    assert_eq!(mapped::mapped_bytes(), 0, "moving the buffer released the file");
    // Out of range, empty and misaligned ranges are refused, not mapped.
    let map = MappedFile::open(&file).unwrap().unwrap();
    assert!(map.buffer::<u8>(0..usize::MAX).is_none());
    assert!(map.buffer::<u8>(4..4).is_none());
    assert!(map.buffer::<f32>(1..5).is_none());
}

/// Two tensors over the same bytes would be two buffers over one mapping: the header parser
/// refuses them, naming the file and the tensor.
#[test]
fn overlapping_tensors_are_refused() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut header = String::from(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend([0u8; 12]);
    std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
    let err = weights::load(dir.path(), &[], &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("invalid offset for tensor `b`"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert_eq!(mapped::mapped_bytes(), 0);
}
