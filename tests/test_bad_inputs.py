"""Every bad input is one clear line on stderr, never a traceback: one table run through the real CLI entry point.

Each row: the command line (with ``{placeholders}`` for files the fixture makes), the expected exit code and a
phrase of the expected message (stderr for errors, stdout for runs that recover). Sampling rows also check that
nothing was written to their ``--output_dir``.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from starflow.assets import DEMO_DIR
from starflow.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    # ---- sample: counts, ratios, guidance, paths
    ("sample --caption x --num_samples 0", 2, "error: --num_samples 0: must be >= 1"),
    ("sample --caption x --fsdp 1 --dry_run", 0, "note: --fsdp 1 shards the flow over the processes of torchrun; one "
     "process samples it whole"),
    ("sample --caption x --target_noise_std 0.2 --no-self_denoise", 2, "which --no-self_denoise turns off, and this"),
    ("sample --caption x --lora_rank 4", 2, "`starflow sample` does not use this key (the weights it samples have any"),
    ("generate-set --caption x --num_samples 2 --out {tmp}/gs --lora_alpha 8", 2, "does not use this key"),
    ("generate-set --caption x --num_samples 2 --out {afile}/sub", 2, "error: --out {afile}/sub: {afile} is a file; pass a folder"),
    ("sample --caption x --output_dir {afile}/sub --dry_run", 2,
     "error: --output_dir {afile}/sub: {afile} is a file; pass a folder"),  # (the dry run refuses what the run would)
    ("sample --caption x --sample_batch_size 0", 2, "error: --sample_batch_size 0: must be >= 1"),
    ("sample --caption x --aspect_ratio 7:3", 2, "error: --aspect_ratio 7:3: this model was trained on square"),
    ("sample --caption x --aspect_ratio wide", 2, "error: --aspect_ratio wide: aspect ratio must look like 'w:h'"),
    ("sample --caption x --aspect_ratio random", 2, "error: --aspect_ratio random draws from the nine trained"),
    ("sample --caption x --cfg -3", 2, "error: --cfg -3: the guidance weight must be >= 0"),
    ("sample --caption x --num_sample 2", 2, "unrecognized arguments: --num_sample 2"),  # (no prefix matching)
    ("sample --caption x --jacobi_th -1", 2, "error: --jacobi_th -1: the stopping threshold must be >= 0"),
    ("sample --caption x --jacobi_block_size 0", 2, "argument --jacobi_block_size: 0: must be >= 1"),
    ("sample --caption x --jacobi_block_size big", 2, "argument --jacobi_block_size: 'big': a number of tokens or 'auto'"),
    ("sample --caption x --output_dir {afile}/sub", 2, "error: --output_dir {afile}/sub: {afile} is a file; pass a folder"),
    ("sample --caption_file {tmp}/negatives.txt --negative_prompt baz", 2, "error: --negative_prompt 'baz': every "
     "caption line names its own negative prompt (after a TAB), so it would apply to none"),
    ("sample --caption_file {tmp}/two_tabs.txt", 2, "holds more than one TAB: write PROMPT<TAB>NEGATIVE PROMPT"),
    ("sample --caption_file {tmp}/missing.txt", 2, "error: --caption_file {tmp}/missing.txt: no such file"),
    ("sample --caption_file {empty_txt}", 2, "error: --caption_file {empty_txt}: no caption in it"),
    ("sample --caption_file {tmp}", 2, "is a folder, not a file"),
    ("sample --caption_file /dev/null --dry_run", 2,
     "error: --caption_file /dev/null: is not a regular file (a pipe or a device, which can be read only once)"),
    ("sample --caption x --input_image {tmp}/missing.png", 2, "error: --input_image {tmp}/missing.png: no such file"),
    ("sample --caption x --input_image {digit_png}", 2, "error: --input_image is for video configs"),
    ("sample --caption x --out_fps 8", 2, "error: --out_fps is for video configs"),
    ("sample --class_id 3", 2, "error: --class_id is for class-conditional models"),
    ("sample --caption x --cfg 0 --attn_temp 2", 2, "error: --attn_temp acts through classifier-free guidance"),
    ("sample --caption x --cfg 0 --negative_prompt y", 2,
     "--negative_prompt / caption-file negatives act through classifier-free guidance, which is off (cfg 0)"),
    ("sample --caption x --no-self_denoise --self_denoising_lr 0.5", 2, "which --no-self_denoise turns off"),
    ("sample --caption x --num_samples 1 --soft_clip 2", 0,
     "note: --soft_clip 2 overrides the model's soft_clip (4.0), which its weights were trained with"),
    ("sample --caption x --no-self_denoise --disable_learnable_denoiser", 2,
     "--disable_learnable_denoiser sets the denoising step, which --no-self_denoise turns off"),
    ("sample --caption x --bogus_flag 1", 2, "unrecognized arguments: --bogus_flag"),
    ("sample --caption x --num_samples two", 2, "argument --num_samples: invalid int value"),
    ("sample --caption x --lr 5", 2, "error: starflow sample: --lr 5: a training key, which `starflow sample` does not"),
    ("sample --caption x --model_config_path {demo}/config.yaml", 2,
     "pass the weights of that config with --checkpoint_path"),
    ("sample --caption x --model_config_path {demo}/config.yaml --dry_run", 0,
     "dry run (nothing loaded or sampled): {demo}/config.yaml alone (no --checkpoint_path: sampling needs its weights"),
    ("sample --captoin x", 2,
     "error: starflow sample: unrecognized arguments: --captoin x (did you mean --caption?)"),
    ("sample --caption x --gif", 2, "error: --gif is for video configs"),
    ("sample --caption x --target_length 8 --dry_run", 2, "error: --target_length is for video configs"),
    ("sample --caption x --caption_file {one_txt}", 2, "error: --caption_file and --caption both give the prompts"),
    ("sample --caption x --jacobi 0 --jacobi_th 0.1 --dry_run", 2, "error: --jacobi_th sets Jacobi decoding, which "
     "--jacobi 0 turns off"),
    ("sample --caption x --jacobi 2", 2, "argument --jacobi: invalid choice: 2"),
    ("sample --caption x --jacobi_th nan", 2, "error: --jacobi_th nan: the stopping threshold must be >= 0"),
    ("sample --temperature 0 --dry_run", 2, "error: --temperature 0: config key 'temperature' scales the sampling"),
    ("sample --caption x --guide_top 99", 2, "error: --guide_top 99: the number of guided blocks must be in 0..4"),
    ("sample --caption x --guide_top 0", 2, "error: --guide_top 0 guides no flow block, which turns guidance (cfg 2) off"),
    ("eval-nll --data {tmp}/nowhere --checkpoint_path {tmp}/nowhere_either.safetensors", 2,
     "error: --data {tmp}/nowhere: no such folder"),
    ("sample --caption x --denoiser_window 3 --dry_run", 2,
     "error: --denoiser_window sets how a video model attends across frames; this config has no vid_size"),
    ("sample --caption x --seed 99999999999999999999", 2, "must be below 2^62 in size"),
    ("generate-set --caption x --num_samples 3 --seed 9223372036854775806 --out {tmp}/seed_set", 2,
     "--seed 9223372036854775806: must be below 2^62 in size"),
    ("sample --caption x --cfg 0 --negative_prompt y --dry_run", 2,
     "--negative_prompt / caption-file negatives act through classifier-free guidance, which is off (cfg 0)"),
    # ---- video flags, checked from the config (so --dry_run refuses them too)
    ("sample --checkpoint_path {moving} --caption x --context_length 2 --dry_run", 2,
     "error: --context_length 2: 4 latent frames fit in one window of 4, so no context is carried over"),
    ("sample --checkpoint_path {moving} --caption x --context_length 9 --target_length 12 --dry_run", 2,
     "error: --context_length 9: must be below the window of 4 latent frames"),
    ("sample --checkpoint_path {moving} --caption x --input_image {digit_png} --input_video {clip} --dry_run", 2,
     "error: --input_video (continuation, video-to-video) cannot be combined with --input_image"),
    ("sample --checkpoint_path {moving} --caption x --input_image {digit_png} --aspect_ratio random", 2,
     "error: --aspect_ratio random draws a ratio per sample, but --input_image fixes the samples' shape"),
    ("sample --checkpoint_path {moving} --caption x --input_image {clip} --dry_run", 2,
     "error: --input_image {clip}: a video file, where an image is expected; pass a clip as --input_video"),
    ("sample --checkpoint_path {moving} --caption x --input_video {corrupt_png} --dry_run", 2,
     "error: --input_video: cannot read the video header of {corrupt_png}: Invalid data found when processing input "
     "(not a video FFmpeg can read, or a damaged one: re-encode it"),
    ("sample --checkpoint_path {v2v} --caption x --input_video {clip} --target_length 8 --dry_run", 2,
     "error: --target_length: a video_to_video model redraws the clip's first 4 frames"),
    # ---- weights: missing, truncated, corrupt, of another model
    ("sample --checkpoint_path {tmp}/nope.safetensors --model_config_path {demo}/config.yaml --caption x", 2,
     "checkpoint not found"),
    # the dry run sizes weights not downloaded yet from their config alone, and says so; without a config it cannot
    ("sample --checkpoint_path {tmp}/nope.pth --model_config_path {repo}/configs/starflow_3B_t2i_256x256.yaml "
     "--caption x --dry_run", 0, "(the weights are not there yet: the plan needs only the config"),
    ("sample --checkpoint_path {tmp}/nope --caption x --dry_run", 2, "checkpoint not found"),
    ("sample --checkpoint_path {tmp}/nope.pth --model_config_path {repo}/configs/starflow_3B_t2i_256x256.yaml "
     "--caption x --dry_run --ema", 2, "error: --ema reads a model folder's ema.safetensors"),
    ("sample --checkpoint_path {truncated} --model_config_path {demo}/config.yaml --caption x", 2, "error: "),
    ("sample --checkpoint_path {garbage} --model_config_path {demo}/config.yaml --caption x", 2, "error: "),
    ("sample --checkpoint_path {other_weights} --model_config_path {demo}/config.yaml --caption x", 2, "shape"),
    ("sample --checkpoint_path {afile} --caption x", 2, "error: "),
    ("convert {tmp}/nope.pth {tmp}/out.safetensors", 2, "checkpoint not found"),
    ("convert {truncated} {tmp}/out.safetensors", 2, "error: "),
    ("export {tmp}/no_run {tmp}/exported", 2, "{tmp}/no_run does not exist: pass a run's logdir"),
    ("export {tmp} {tmp}/exported", 2, "no training checkpoint in {tmp}"),
    ("convert {demo}/config.yaml {tmp}/o.safetensors", 2, "config.yaml: a config file, not weights"),
    ("validate {repo}/tests", 2, "{repo}/tests is a folder: pass a config file"),
    ("convert {demo}/model.safetensors {tmp} --overwrite", 2, "is a folder: DST names the weights file"),
    ("convert {demo}/model.safetensors {tmp}", 2, "is a folder: DST names the weights file"),
    ("export {run} /proc/x.pth", 2, "error: DST /proc/x.pth: cannot write in /proc ("),
    ("convert {demo}/model.safetensors {afile}/c.pth", 2, "error: DST {afile}/c.pth: {afile} is a file, so"),
    ("export {run} {afile}/sub", 2, "error: DST {afile}/sub: {afile} is a file, so {afile}/sub cannot be made there"),
    ("inpaint --input_image {digit_png} --mask_box 0,0,4,4 --caption x --output_dir /proc/inp", 2,
     "--output_dir /proc/inp: cannot write in /proc"),
    ("sample --checkpoint_path {run} --caption x", 2, "{run} is a training run, not a model folder: pass {run}/model, "
     "or write a model folder with `starflow export {run} OUT_FOLDER`"),
    ("sample --checkpoint_path {run}/checkpoints/step_00000002 --ema --caption x", 2, "{run}/checkpoints/step_00000002 "
     "is a training checkpoint, not a model folder: write a model folder with `starflow export "
     "{run}/checkpoints/step_00000002 OUT_FOLDER --ema` (the moving average as its weights)"),
    ("pack {digits} /proc/packs", 2, "OUT /proc/packs: cannot write in /proc (No such file or directory); pass a "
     "writable place"),
    ("validate {tmp}/nope.yaml", 2, "config file not found"),
    ("validate {demo}", 2, "error: {demo} is a folder: pass its config, {demo}/config.yaml"),
    ("validate {bad_yaml}", 2, "not a readable YAML file at line"),
    ("sample --checkpoint_path {no_t5} --caption x", 2, "cannot find the text encoder 'text_encoder' (no folder "
     "{no_t5}/text_encoder beside the config, nor in the Hugging Face cache or Hub: "),
    ("validate {empty_yaml}", 2, "empty.yaml: the config is empty; the configs are in configs/"),
    ("validate {demo}/config.yaml --num_workers -1", 2, "config key 'num_workers' must be >= 0, got -1"),
    ("validate {moving}/config.yaml --soft_clip -1", 2, "config key 'soft_clip' must be >= 0, got -1.0"),
    ("train --config {demo}/config.yaml --data {fifo} --logdir {tmp}/fiforun --dry_run", 2,
     "no {fifo}/metadata.jsonl: an image folder needs a 'metadata.jsonl' file"),
    ("generate-set --checkpoint_path {demo} --caption x --num_samples 2 --out ''", 2,
     "--out '': an empty path; name the file or folder"),
    ("pack {digits} ''", 2, "OUT '': an empty path; name the file or folder"),
    ("sample --caption x --model_config_path {digit_png} --checkpoint_path {demo}", 2, "not a readable YAML file"),
    ("sample --caption x --device foo", 2, "error: --device foo: not a device"),
    ("sample --caption x --device xpu --checkpoint_path {demo}", 2,
     "error: --device xpu: xpu devices are not supported; use cpu, cuda or cuda:N"),
    ("eval-nll --checkpoint_path {demo} --data {digits} --device mps", 2,
     "error: --device mps: this PyTorch has no Apple GPU (MPS) to run on; use --device cpu"),
    ("generate-set --checkpoint_path {demo} --caption x --num_samples 2 --out {afile}", 2, "--out {afile}: is a file"),
    ("validate {demo}/config.yaml --gpus 0", 2, "argument --gpus: must be >= 1, got 0"),
    ("validate {demo}/config.yaml --txt_dim 0", 2, "argument --txt_dim: must be >= 1, got 0"),
    ("eval-nll --checkpoint_path {demo} --data {digits} --batch_size 0", 2, "error: --batch_size 0: must be >= 1"),
    ("train --config {cfg} --data {digits} --logdir {afile}", 2, "error: --logdir {afile}: is a file"),
    ("train --config {cfg} --data {digits} --logdir {afile}/run", 2,
     "error: --logdir {afile}/run: {afile} is a file, so the folder cannot be made"),
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_lr --lr -1", 2, "config key 'lr' (the peak learning rate)"),
    ("train --config {repo}/configs/demo_moving_digits.yaml --data {digits} --logdir {tmp}/r_kind", 2,
     "--data {digits}: holds images ("),
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_minlr --lr 1e-3 --min_lr 0.5", 2,
     "error: --min_lr 0.5: config key 'min_lr' (0.5) is above 'lr' (0.001)"),  # (the flag that made it, named)
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_lora --lora_rank 4", 2,
     "--lora_rank 4 trains low-rank adapters over base weights: pass them with --init_from"),
    # ---- config keys: unknown, ill-typed, out of range, cross-field
    ("train --config {unknown_key_cfg} --data {digits} --logdir {tmp}/r_unknown", 2,
     "unknown config key 'nosie_std'; did you mean 'noise_std'?"),
    ("sample --caption x --img_size abc", 2, "error: --img_size abc: config key 'img_size' expects an integer"),
    ("sample --caption x --noise_std -1", 2, "config key 'noise_std' must be >= 0"),
    ("sample --caption x --finetuned_vae some/folder", 2, "config key 'finetuned_vae'"),
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_steps --steps 0", 2, "config key 'steps' must be >= 1"),
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_secondary --secondary_ratio 0.5", 2,
     "config key 'secondary_ratio' > 0 trains some steps on secondary images"),
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_batch --batch_size 7 --grad_accum 2", 2,
     "must be divisible by world size x grad_accum"),
    # ---- data folders: empty, corrupt metadata, nothing readable
    ("train --config {cfg} --data {empty} --logdir {tmp}/r_empty", 2, "metadata.jsonl"),
    ("train --config {cfg} --data {bad_meta} --logdir {tmp}/r_meta", 2, "metadata.jsonl:2"),
    ("train --config {cfg} --data {all_corrupt} --logdir {tmp}/r_corrupt", 2, "is unreadable"),
    ("train --config {cfg} --data {tmp}/nowhere --logdir {tmp}/r_nodata", 2, "error: --data {tmp}/nowhere: no such folder"),
    ("train --config {cfg} --data {digits}/metadata.jsonl --logdir {tmp}/r_datafile", 2,
     "--data {digits}/metadata.jsonl: a file, not a folder (pass {digits})"),
    ("train --config {cfg} --data {video_meta} --logdir {tmp}/r_videos", 2, "holds videos (clip_0.mp4), but this is an image"),
    ("eval-nll --checkpoint_path {demo} --data {empty}", 2, "metadata.jsonl"),
    ("eval-nll --checkpoint_path {demo} --data {video_meta}", 2, "lists videos (clip_0.mp4, ...): eval-nll scores"),
    ("eval-nll --checkpoint_path {demo} --data {digits} --out {tmp}/nowhere/nll.json", 2,
     "--out {tmp}/nowhere/nll.json: its folder {tmp}/nowhere does not exist"),
    ("eval-nll --checkpoint_path {demo} --data {one_corrupt}", 2, "error: cannot read image {one_corrupt}/b.png: cannot identify image file"),
    ("eval-nll --checkpoint_path {demo} --data {bad_meta_missing}", 2, "file(s) listed in"),
    ("eval-nll --checkpoint_path {demo} --data {digits} --num_samples 0", 2, "error: --num_samples 0: must be >= 1"),
    ("pack {empty} {tmp}/shards", 2, "metadata.jsonl"),
    ("pack {digits} {afile}", 2, "error: OUT {afile}: is a file"),
    ("cache-latents --config {cfg} --data {digits} --out {afile}", 2, "error: --out {afile}: is a file"),
    ("cache-latents --config {cfg} --data {digits} --out {tmp}/c_drop --drop_image 0.5", 2,
     "error: config key 'drop_image' (0.5) drops the first frame of video clips; this config has no vid_size"),
    ("sample --checkpoint_path {tmp}/no_model --caption x", 2, "error: --checkpoint_path {tmp}/no_model: checkpoint not found"),
    ("cache-latents --config {cfg} --data {empty} --out {tmp}/cache", 2, "metadata.jsonl"),
    ("cache-latents --config {v2v_cfg} --data {video_meta} --out {tmp}/cache_v2v", 2,
     "video_to_video / last_frame_cond encode parts of each clip, which a latent cache of whole clips does not hold"),
    ("cache-latents --config {v2v_cfg} --data {tmp}/no_data --out {tmp}/cache_v2v", 2,  # (the config first)
     "video_to_video / last_frame_cond encode parts of each clip, which a latent cache of whole clips does not hold"),
    ("cache-latents --config {cfg} --data {digits} --out {tmp}/cache_lr --lr 3", 2,
     "--lr 3: a training key, which `starflow cache-latents` does not use"),
    # ---- applications and sample sets
    ("inpaint --input_image {tmp}/missing.png --mask_box 0,0,4,4 --caption x --output_dir {tmp}/inp1", 2,
     "error: --input_image {tmp}/missing.png: no such file"),
    ("inpaint --input_image {digit_png} --mask_box 0,0,40,4 --caption x --output_dir {tmp}/inp2", 2,
     "error: --mask_box 0,0,40,4: needs 0 <= x0 < x1 <= 8"),
    ("inpaint --input_image {digit_png} --mask_box a,b --caption x --output_dir {tmp}/inp3", 2,
     "error: --mask_box a,b: expected four integers"),
    ("inpaint --input_image {digit_png} --mask_box -1,0,4,4 --caption x --output_dir {tmp}/inp5", 2,
     "expected one argument; a value that starts with '-' goes after '=': --mask_box=VALUE"),
    ("inpaint --input_image {corrupt_png} --mask_box 0,0,4,4 --caption x --output_dir {tmp}/inp4", 2,
     "error: --input_image: cannot read image {corrupt_png}: "),  # the flag, and the path once
    ("edit --input_image {digit_png} --caption x --output_dir {tmp}/ed1", 2, "edit needs --source_caption and --caption"),
    ("inpaint --input_image {wide_png} --mask_box 0,0,16,32 --caption x --output_dir {tmp}/inp7", 2,
     "the input is resized and centre-cropped to it, keeping x 16..48 and y 0..32 of its pixels"),
    ("inpaint --input_image {odd_png} --mask_box 31,0,40,24 --caption x --output_dir {tmp}/inp10", 2,
     "keeping x 6.15..30.8 and y 0..24 of its pixels"),  # (resized to 13 x 8, rounded: columns 2..10 kept)
    ("inpaint --input_image {digit_png} --mask_box 0,4,8,8 --caption x --vid_size 4:8 --output_dir {tmp}/inp11", 2,
     "error: --vid_size 4:8: inpaint works on image models, and the flag makes"),
    ("inpaint --input_image {digit_png} --mask {wide_png} --caption x --output_dir {tmp}/inp8", 2,
     "error: --mask {wide_png}: 64x32 pixels, but the input image is 8x8"),
    ("inpaint --input_image {exif_png} --mask_box 0,8,8,16 --caption x --output_dir {tmp}/inp9", 0,
     "wrote result.png"),  # the box is in the image's displayed (EXIF-rotated) pixels
    ("inpaint --input_image {digit_png} --mask_box 0,4,8,8 --caption x --steps 3 --output_dir {tmp}/inp5", 2,
     "--steps 3: a training key"),
    ("inpaint --input_image {digit_png} --mask_box 0,4,8,8 --caption x --jacobi_max_iter 1 --output_dir {tmp}/inp11",
     0, "note: --jacobi_block_size auto decodes 32 rows on cpu token by token (faster there than Jacobi), so "
        "--jacobi_max_iter acts on nothing"),  # (as sample says it: every command)
    ("inpaint --input_image {digit_png} --mask {black_png} --caption x --output_dir {tmp}/inp6", 2,
     "error: --mask {black_png}: no white pixel"),
    ("inpaint --input_image {digit_png} --mask_box 0,4,8,8 --caption x --output_dir {afile}/sub", 2,
     "error: --output_dir {afile}/sub: "),
    ("generate-set --checkpoint_path {demo} --caption x --num_samples 0 --out {tmp}/set0", 2, "--num_samples 0"),
    ("generate-set --checkpoint_path {demo} --caption_file {tmp}/none.txt --num_samples 2 --out {tmp}/set1", 2,
     "--caption_file {tmp}/none.txt: no such file"),
    ("evaluate --samples {tmp}/no_samples --metrics fid --reference {tmp}/no_ref", 2, "error: "),
    ("evaluate --samples {digits} --metrics fid --reference {digits}", 2, "torch-fidelity"),  # an optional package
    ("evaluate --samples {digits} --metrics clip --reference {digits}", 2, "--metrics clip uses no real images"),
    ("evaluate --samples {digits} --reference {digits} --features digits --clip_model x", 2,
     "--clip_model is for the clip metric"),
    ("evaluate --samples {digits} --metrics clip --features digits", 2, "--features is for fid, kid"),
    ("evaluate --samples {digits} --reference {digits} --features digits --out {tmp}/nodir/m.json", 2,
     "its folder {tmp}/nodir does not exist"),
    ("evaluate --samples {digits} --reference {digits} --features digits --save_stats {tmp}/refstats", 2,
     "name the file FILE.npz"),
    ("evaluate --samples {digits} --reference {digits} --features digits --batch_size 0", 2,
     "argument --batch_size: must be >= 1, got 0"),
    ("evaluate --samples {three} --reference {digits} --features digits --metrics precision_recall", 2,
     "precision_recall needs at least 4 images per set (k-NN balls of k = 3); the samples set holds 3"),
    ("evaluate --samples {single} --reference {digits} --features digits --metrics fid,kid", 2,  # (KID was NaN)
     "fid needs at least 2 images per set (a covariance); the samples set holds 1"),
    ("evaluate --samples {single} --reference {digits} --features digits --metrics fid --out {tmp}/nodir/m.json", 2,
     "its folder {tmp}/nodir does not exist"),  # (the output is checked before the sets are counted)
    ("evaluate --samples {video_set} --reference {digits} --features digits", 2, "holds videos (a.mp4, ...)"),
    # ---- interrupted runs: a half-written checkpoint is skipped, a corrupt one named; sample sets resume
    ("train --config {cfg} --data {digits} --logdir {run_partial} --steps 3", 0, "resumed from"),
    ("train --config {cfg} --data {digits} --logdir {run_corrupt} --steps 3", 2, "is corrupt or incomplete"),
    ("train --config {cfg} --data {digits} --logdir {run} --steps 3 --channels 48", 2,
     "holds a model of another shape (Size mismatch between saved torch.Size([32, 4]) and current: torch.Size([48, 4])"),
    ("train --config {cfg} --data {digits} --logdir {run} --steps 3 --no-resume", 2,
     "error: --no-resume: {run} holds the checkpoints of another run (latest step_00000002)"),
    ("train --config {cfg} --data {digits} --logdir {run} --steps 1", 2,
     "error: the run in {run} is at step 2, past --steps 1: raise --steps"),
    ("train --config {cfg} --data {digits} --logdir {run} --steps 3 --no-resume --dry_run", 2,  # as the run would
     "error: --no-resume: {run} holds the checkpoints of another run (latest step_00000002)"),
    ("train --config {cfg} --data {digits} --logdir {run} --steps 1 --dry_run", 2,
     "error: the run in {run} is at step 2, past --steps 1: raise --steps"),
    ("train --config {cfg} --data {digits} --logdir {run} --steps 2 --dry_run", 0,
     "is at step 2 of --steps 2: nothing to train (raise --steps to go on); the run would write its model folder "
     "again; this dry run checks one step"),
    ("train --config {cfg} --data {digits} --logdir {tmp}/r_log0 --log_freq 0", 2, "config key 'log_freq' must be >= 1"),
    ("validate {cfg} --max_nonfinite -1", 2, "config key 'max_nonfinite' must be >= 0 (0 = off)"),
    ("validate {cfg} --ema_start 100", 2, "config key 'ema_start' (100) acts only with ema > 0"),
    ("validate {cfg} --loss_scaling 1", 0, "note: train would refuse this config as it is (sampling takes it): config "
     "key 'loss_scaling: 1' (fp16 dynamic loss scaling) is not supported"),
    ("validate {cfg} --drop_image 0.5", 0, "drops the first frame of video clips; this config has no vid_size"),
    ("validate {repo}/configs/starflow_3B_t2i_256x256.yaml --img_size 250", 2, "config key 'img_size' (250) must be "
     "a multiple of the VAE's factor x patch_size (8 x 1 = 8): use 248 or 256"),
    ("validate {cfg} --pt_seq_len 0", 2, "config key 'pt_seq_len' must be >= 1, got 0 (leave it out for its default"),
    ("validate {demo}/config.yaml --grad_accum 3", 0, "note: train would refuse this config as it is (sampling takes "
     "it): config key 'batch_size' (64) must be divisible by world size x grad_accum (1 x 3)"),
    ("validate {demo}/config.yaml --gpus 3", 0, "must be divisible by world size x grad_accum (3 x 1)"),
    ("validate {demo}/config.yaml --lora_rank 4", 0, "note: train would refuse this config as it is (sampling takes "
     "it): --lora_rank 4 trains low-rank adapters over base weights: pass them with --init_from"),
    ("validate {cfg} --logdir none", 2, "config key 'logdir' ('none') names no folder"),
    ("validate {cfg} --rope 0 --pt_seq_len 4", 2, "error: --pt_seq_len 4 acts only with rope: 1, which this config does "
     "not set: drop it"),  # a flag that could not act: refused; the same key set by a file: a note
    ("validate {cfg} --txt_size 0 --text none --cfg 0 --drop_label 0", 0, "note: config key 'cond_top_only' (True) is "
     "unused: it acts only with text conditioning (txt_size > 0)"),
    ("validate {cfg} --lora_alpha 3", 2, "config key 'lora_alpha' (3.0) acts only with lora_rank > 0"),
    ("validate {cfg} --checkpoint {tmp}", 2, "error: --checkpoint {tmp}: no weights in this folder"),
    ("validate {cfg} --checkpoint {run}", 0, "every name and shape matches"),  # a run's logdir: its latest checkpoint
    ("generate-set --checkpoint_path {demo} --caption x --num_samples 4 --out {set_half}", 0, "2 already there"),
    ("generate-set --checkpoint_path {demo} --caption y --num_samples 4 --out {set_half}", 2, "error: "),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_config, digits, make_pipeline) -> dict[str, str]:
    """Every file and folder the table's placeholders name."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    f: dict[str, str] = {"tmp": str(tmp), "demo": str(DEMO_DIR), "digits": str(digits["train"]),
                         "repo": str(DEMO_DIR.parents[1])}
    (tmp / "afile").write_text("a file, not a folder")
    f["afile"] = str(tmp / "afile")
    (tmp / "empty").mkdir()
    f["empty"] = str(tmp / "empty")
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "negatives.txt").write_text("a handwritten digit 1\tfoo\n")
    (tmp / "two_tabs.txt").write_text("a handwritten digit 1\tfoo\tbar\n")
    (tmp / "bad.yaml").write_text("arguments:\n- img_size: [8\n")
    f["bad_yaml"] = str(tmp / "bad.yaml")
    shutil.copytree(DEMO_DIR, tmp / "no_text_encoder", ignore=shutil.ignore_patterns("text_encoder"))
    f["no_t5"] = str(tmp / "no_text_encoder")
    (tmp / "empty.yaml").write_text("# nothing\n")
    f["empty_yaml"] = str(tmp / "empty.yaml")
    (tmp / "fifo").mkdir()
    os.mkfifo(tmp / "fifo" / "metadata.jsonl")  # (opening it would wait for a writer)
    f["fifo"] = str(tmp / "fifo")
    f["empty_txt"] = str(tmp / "empty.txt")
    first = json.loads((digits["train"] / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    f["digit_png"] = str(digits["train"] / first)
    for name, folder in (("moving", "demo_moving_digits"), ("v2v", "demo_moving_digits_v2v")):
        f[name] = str(DEMO_DIR.parent / folder)
    f["clip"] = str(DEMO_DIR.parents[1] / "docs" / "real_clip_5_right.mp4")
    f["v2v_cfg"] = str(DEMO_DIR.parents[1] / "configs" / "demo_moving_digits_v2v.yaml")
    (tmp / "one.txt").write_text("a handwritten digit 1\n")
    f["one_txt"] = str(tmp / "one.txt")
    Image.new("L", (64, 32), 255).save(tmp / "wide.png")
    f["wide_png"] = str(tmp / "wide.png")
    Image.new("L", (40, 24), 255).save(tmp / "odd.png")  # resized to 13 x 8 (rounded), then cropped to 8 x 8
    f["odd_png"] = str(tmp / "odd.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 16 wide x 8 high, displayed rotated: 8 wide x 16 high
    Image.new("L", (16, 8), 128).save(tmp / "exif.png", exif=exif)
    f["exif_png"] = str(tmp / "exif.png")
    Image.new("L", (8, 8), 0).save(tmp / "black.png")
    f["black_png"] = str(tmp / "black.png")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    f["corrupt_png"] = str(tmp / "corrupt.png")
    weights = (DEMO_DIR / "model.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(weights[: len(weights) // 2])
    f["truncated"] = str(tmp / "truncated.safetensors")
    (tmp / "garbage.pth").write_bytes(b"not a checkpoint at all")
    f["garbage"] = str(tmp / "garbage.pth")
    other = tmp / "other"
    make_pipeline().save_pretrained(other)  # a model of another shape than the demo's config
    f["other_weights"] = str(other / "model.safetensors")
    config = dict(tiny_config, steps=2, save_freq=1, keep_last=3, batch_size=8)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    f["cfg"] = str(tmp / "config.yaml")
    (tmp / "unknown.yaml").write_text(yaml.safe_dump(dict(config, nosie_std=0.1)))
    f["unknown_key_cfg"] = str(tmp / "unknown.yaml")
    bad = tmp / "bad_meta"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": first, "text": "x"}) + "\n{not json\n")
    f["bad_meta"] = str(bad)
    gone = tmp / "missing_file"
    gone.mkdir()
    shutil.copy(Path(f["digits"]) / first, gone / "a.png")
    (gone / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": "x"}) for n in ("a.png", "b.png")))
    f["bad_meta_missing"] = str(gone)
    one = tmp / "one_corrupt"
    one.mkdir()
    shutil.copy(Path(f["digits"]) / first, one / "a.png")
    (one / "b.png").write_bytes(b"garbage")
    (one / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": "x"}) for n in ("a.png", "b.png")))
    f["one_corrupt"] = str(one)
    three = tmp / "three"
    three.mkdir()
    for k in range(3):
        shutil.copy(Path(f["digits"]) / first, three / f"{k}.png")
    f["three"] = str(three)
    single = tmp / "single"
    single.mkdir()
    shutil.copy(Path(f["digits"]) / first, single / "a.png")
    f["single"] = str(single)
    video_set = tmp / "video_set"
    video_set.mkdir()
    shutil.copy(Path(f["digits"]) / first, video_set / "a.png")
    (video_set / "a.mp4").write_bytes(b"a video")
    f["video_set"] = str(video_set)
    corrupt = tmp / "all_corrupt"
    corrupt.mkdir()
    lines = []
    for k in range(8):
        (corrupt / f"{k}.png").write_bytes(b"garbage")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": "a handwritten digit 1"}))
    (corrupt / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    f["all_corrupt"] = str(corrupt)
    videos = tmp / "videos"
    videos.mkdir()
    (videos / "metadata.jsonl").write_text(json.dumps({"file_name": "clip_0.mp4", "text": "a moving digit"}) + "\n")
    f["video_meta"] = str(videos)
    # a run of 2 steps; one copy gets a half-written third checkpoint, the other a damaged latest one
    run = tmp / "run"
    with torch.random.fork_rng(devices=[]):
        assert main(["train", "--config", f["cfg"], "--data", f["digits"], "--logdir", str(run), "--device", "cpu"]) == 0
    partial, damaged = tmp / "run_partial", tmp / "run_corrupt"
    shutil.copytree(run, partial)
    shutil.copytree(run, damaged)
    steps = sorted((partial / "checkpoints").iterdir())
    half = partial / "checkpoints" / steps[-1].name.replace("2", "3")
    shutil.copytree(steps[-1], half)
    (half / "trainer.json").unlink()  # killed before the checkpoint was complete
    latest = sorted((damaged / "checkpoints").iterdir())[-1]
    for tensor_file in latest.glob("*.distcp"):
        tensor_file.write_bytes(tensor_file.read_bytes()[:64])
    f["run_partial"], f["run_corrupt"], f["run"] = str(partial), str(damaged), str(run)
    # a sample set killed half way: 2 of its 4 images exist
    half_set = tmp / "set_half"
    assert main(["generate-set", "--checkpoint_path", f["demo"], "--caption", "x", "--num_samples", "4",
                 "--out", str(half_set), "--device", "cpu"]) == 0
    for png in sorted(half_set.glob("*.png"))[2:]:
        png.unlink()
    f["set_half"] = str(half_set)
    return f


@pytest.mark.parametrize("command, code, phrase", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input(command: str, code: int, phrase: str, files: dict[str, str], tmp_path: Path, capsys) -> None:
    argv = [part.format(**files) for part in shlex.split(command)]
    out_dir = tmp_path / "out"
    if argv[0] == "sample" and "--output_dir" not in argv:
        argv += ["--output_dir", str(out_dir)]
    if argv[0] in ("sample", "train", "eval-nll", "generate-set", "inpaint", "edit", "cache-latents") \
            and "--device" not in argv:
        argv += ["--device", "cpu"]
    if "--output_dir" in argv:
        out_dir = Path(argv[argv.index("--output_dir") + 1])
    new_logdir = None
    if "--logdir" in argv and not Path(argv[argv.index("--logdir") + 1]).exists():
        new_logdir = Path(argv[argv.index("--logdir") + 1])
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors
        got = e.code
    captured = capsys.readouterr()
    text = captured.err if code else captured.out + captured.err
    assert got == code, f"{argv}: exit {got}, stderr: {captured.err[-2000:]}"
    assert phrase.format(**files) in text, f"{argv}: {text[-2000:]}"
    assert "Traceback" not in captured.err
    if code:
        errors = [line for line in captured.err.splitlines() if line.startswith("error:") or ": error:" in line]
        assert len(errors) == 1 and "usage:" not in captured.err, captured.err  # one line says it
        assert not out_dir.exists()  # nothing half-written
        assert new_logdir is None or not new_logdir.exists()  # a refused run leaves no logdir behind


def test_corrupt_images_met_mid_epoch_are_counted(tmp_path: Path, digits, tiny_config, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = (digits["train"] / "metadata.jsonl").read_text().splitlines()[:14]
    for line in lines:
        name = json.loads(line)["file_name"]
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).symlink_to((digits["train"] / name).resolve())
    for k in range(2):  # listed like any other image: found unreadable only when a batch loads them
        (data / f"broken_{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        lines.insert(5 + 4 * k, json.dumps({"file_name": f"broken_{k}.png", "text": "a handwritten digit 0"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(tiny_config, steps=3, batch_size=8, log_freq=1, save_freq=3,
                                          num_workers=1)))
    logdir = tmp_path / "run"
    with torch.random.fork_rng(devices=[]):
        assert main(["train", "--config", str(config), "--data", str(data), "--logdir", str(logdir),
                     "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_images"] for r in records if "skipped_images" in r]
    assert counts[0] <= counts[-1] == 2  # both met by the DataLoader worker within 3 steps of 8 (16 listed)
    captured = capsys.readouterr()
    summary = captured.out + captured.err
    assert "2 data file(s) skipped" in summary and "broken_" in summary


def test_video_frame_counts_the_vae_cannot_make_are_refused() -> None:
    from starflow.cli import build_parser
    from starflow.cli.sample import sample_settings
    from starflow.config import load_config

    from helpers import TINY_VIDEO

    wan = load_config(dict(TINY_VIDEO, img_size=32, patch_size=1, channel_size=48, vid_size="5:8",
                           vae="Wan-AI/Wan2.2-TI2V-5B-Diffusers"))
    args = build_parser().parse_args(["sample", "--caption", "x", "--target_length", "6"])
    with pytest.raises(ValueError, match=r"--target_length 6: the VAE decodes 4k\+1 frames .* use 5 or 9"):
        sample_settings(args, wan)
    assert sample_settings(build_parser().parse_args(["sample", "--caption", "x", "--target_length", "9"]), wan)
    pixels = load_config(dict(TINY_VIDEO))  # no VAE: any frame count
    assert sample_settings(args, pixels).target_length == 6


def test_non_finite_samples_are_an_error_not_black_images(tmp_path, capsys) -> None:
    """Guidance far beyond what the model takes gives NaN samples (cfg is finite, so it passes the input checks):
    the command stops with one error line instead of writing black images that a metric would then score."""
    for command in (["sample", "--output_dir", str(tmp_path / "a")], ["generate-set", "--out", str(tmp_path / "b")]):
        assert main([*command, "--caption", "a handwritten digit 3", "--num_samples", "2", "--cfg", "1e10",
                     "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "samples came out non-finite (NaN or inf), which would be written as black images" in err
        assert "the guidance (cfg) or temperature is too large for this model" in err
        assert "Traceback" not in err and not list(tmp_path.rglob("*.png"))
    # weights that hold a NaN are named as the cause, not the settings
    from starflow.assets import DEMO_DIR
    from starflow.sampling.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(DEMO_DIR)
    name = next(n for n, _ in pipe.model.named_parameters() if n.endswith("proj_in.weight"))
    with torch.no_grad():
        pipe.model.get_parameter(name)[0, 0] = float("nan")
    pipe.save_pretrained(tmp_path / "broken")
    assert main(["sample", "--checkpoint_path", str(tmp_path / "broken"), "--caption", "a", "--num_samples", "1",
                 "--output_dir", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert f"the model's weights are not finite ({name} holds NaN or inf)" in capsys.readouterr().err


def test_a_home_folder_after_equals_is_the_home_folder(tmp_path, monkeypatch, capsys) -> None:
    """``--output_dir=~/x``: the shell leaves the ~ (it follows '='); the command expands it, as the user meant."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--caption", "a handwritten digit 1", "--num_samples", "1", "--device", "cpu",
                 "--output_dir=~/samples"]) == 0
    assert (tmp_path / "home" / "samples" / "grid.png").is_file() and not (tmp_path / "~").exists()
    (tmp_path / "home" / "captions.txt").write_text("a handwritten digit 2\n")
    assert main(["sample", "--caption_file=~/captions.txt", "--device", "cpu", "--output_dir=~/more"]) == 0
    assert len(list((tmp_path / "home" / "more").glob("*digit_2.png"))) == 1
    assert main(["sample", "--caption", "~/not a path", "--num_samples", "1", "--device", "cpu",
                 "--output_dir=~/text"]) == 0  # a caption stays as it is
    assert "~/not a path" in (tmp_path / "home" / "text" / "settings.json").read_text()


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(files, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    import starflow.files
    from starflow.sampling.pipeline import Pipeline

    def refused(*args, **kwargs):  # (root writes anywhere: the refusal another user gets, simulated)
        raise PermissionError(13, "Permission denied")

    def loaded(*args, **kwargs):
        raise AssertionError("the weights were loaded before the output folder was checked")

    monkeypatch.setattr(starflow.files.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(Pipeline, "from_pretrained", loaded)
    for command, flag, target in (
            (["train", "--config", files["cfg"], "--data", files["digits"], "--logdir"], "--logdir", tmp_path / "r" / "x"),
            (["generate-set", "--caption", "x", "--num_samples", "2", "--out"], "--out", tmp_path / "set"),
            (["sample", "--caption", "x", "--output_dir"], "--output_dir", tmp_path / "samples")):
        assert main([*command, str(target), "--device", "cpu"]) == 2
        assert f"{flag} {target}: cannot write in {tmp_path} (Permission denied)" in capsys.readouterr().err
        assert not target.exists()


def test_an_install_without_the_shipped_checkpoints_says_where_they_come_from(digits, tmp_path, monkeypatch,
                                                                              capsys) -> None:
    """A wheel installed elsewhere has no ckpts/: the demo-defaulting commands say so, and so does the digit
    classifier, naming where its weights must go."""
    import starflow.assets as assets
    from starflow.evaluation.features import DigitClassifier

    monkeypatch.setattr(assets, "DEMO_DIR", tmp_path / "site-packages" / "ckpts" / "demo_digits")
    for command in (["sample", "--caption", "x", "--output_dir", str(tmp_path / "o")],
                    ["sample", "--caption", "x", "--dry_run"],
                    ["generate-set", "--caption", "x", "--num_samples", "1", "--out", str(tmp_path / "s")],
                    ["eval-nll", "--data", str(digits["test"])]):
        assert main([*command, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"the shipped demo ({assets.DEMO_DIR}) is not there: the shipped checkpoints come with a source " \
               "checkout" in err, (command, err)
    with pytest.raises(FileNotFoundError, match=f"--out {tmp_path / 'features'}"):
        DigitClassifier.load(tmp_path / "features")


def test_pickled_t5_and_vae_weights_that_would_run_code_are_refused_by_name(tmp_path: Path, runs_code) -> None:
    """A T5 or VAE folder whose pickled weights (pytorch_model.bin) name more than tensors: transformers and
    diffusers refuse them (weights-only loading); the error names the model and the global, as bad input."""
    from safetensors.torch import load_file

    from starflow.adapters import build_tiny_sd_vae, build_tiny_text_encoder
    from starflow.adapters.text import TextEncoder
    from starflow.adapters.vae import SDVAEAdapter

    payload, marker = runs_code
    t5 = tmp_path / "t5"
    build_tiny_text_encoder(8).save_pretrained(t5)
    state = dict(load_file(t5 / "model.safetensors"), evil=payload)
    (t5 / "model.safetensors").unlink()
    torch.save(state, t5 / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"the T5 text encoder .*t5' has a weights file holding Python objects besides "
                                         r"tensors \(it names posix.system\), which loading could run as code"):
        TextEncoder.from_pretrained(str(t5), max_length=8)
    vae = tmp_path / "vae"
    build_tiny_sd_vae().vae.save_pretrained(vae, safe_serialization=False)
    state = torch.load(vae / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save(dict(state, evil=payload), vae / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"the SD-VAE .*vae' has a weights file holding Python objects besides tensors "
                                         r"\(it names posix.system\)"):
        SDVAEAdapter.from_pretrained(str(vae))
    assert not marker.exists()
    (t5 / "pytorch_model.bin").unlink()
    (t5 / "model.safetensors").write_bytes(b"\x10\x00")  # a download cut short
    with pytest.raises(ValueError, match=r"the T5 text encoder .*t5' has a damaged weights file \(\w+: Error while "
                                         "deserializing header"):
        TextEncoder.from_pretrained(str(t5), max_length=8)
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02garbage")  # damaged, not hostile
    with pytest.raises(ValueError, match=r"the SD-VAE .*vae' has a damaged weights file \(it does not unpickle\): "
                                         "download it again"):
        SDVAEAdapter.from_pretrained(str(vae))
