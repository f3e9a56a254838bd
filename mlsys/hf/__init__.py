"""Hugging Face checkpoints in and out for the decoder families (gpt: GPT-2; llama: Llama, Mistral, Qwen2).

config.py maps config.json to model keys and back; names.py is the one table of tensor names both directions read;
files.py reads safetensors region by region; load.py places the weights born sharded; importer.py writes an mlsys
run dir (python -m experiments.import_hf). trainer.init_from=hf:<folder> fine-tunes straight from a folder
(mlsys/train/pretrained.py); experiments.export format=hf writes one (mlsys/export/hf_export.py)."""
