"""bench/report.py: the report, the plot and the README's generated section."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402


def summary(gpu="NVIDIA H200", date="2026-11-28T00:00:00+00:00"):
    moepp = {"median_ms": 1.0, "size": "0.6b", "tau": 0.5, "target_zc_share": 0.5, "measured_zc_share": 0.49,
             "ideal_speedup": 2.0, "paper_speedup": 1.38, "nvml_before": {"throttled": True}}
    return {
        "environment": {"gpu": gpu, "torch": "2.11", "commit": "abc123", "date": date},
        "cases": {
            "table3 cuda 0.6b T=16384 tau=0.50": {
                "impls": {"moepp": moepp, "vanilla": {"median_ms": 1.8}}, "speedup_vs_vanilla": 1.8,
                "ideal_speedup": 2.0, "fraction_of_ideal": 0.9, "paper_speedup": 1.38, "target_zc_share": 0.5,
                "measured_zc_share": 0.49},
            "layer cuda 7b T=16384 forward": {
                "impls": {"fused": {"median_ms": 2.0}, "reference": {"median_ms": 20.0}, "gemm_floor": {"median_ms": 1.6}},
                "speedup": 10.0, "speedup_bound": 12.5},
            "model cuda longcat-flash T=8192 bfloat16 forward": {
                "impls": {"original": {"median_ms": 30.0, "tokens_per_s": 273067.0},
                          "swapped": {"median_ms": 10.0, "tokens_per_s": 819200.0}},
                "speedup_vs_original": 3.0, "speedup_vs_original_rounds": [2.9, 3.1]},
            "peers cpu moepp-0.6b T=4096 float32 forward": {
                "impls": {"fused": {"median_ms": 200.0}, "released_loop": {"median_ms": 240.0},
                          "gemm_floor": {"median_ms": 190.0}},
                "speedup_vs_peer": 1.2, "peer": "released_loop", "fraction_of_gemm_floor": 0.95},
            "router cpu N768_k12 T=4096 residual": {
                "impls": {"fused": {"median_ms": 30.0}, "torch_ops": {"median_ms": 40.0},
                          "residual_gemm": {"median_ms": 25.0}},
                "speedup": 6.0, "speedup_vs_torch_ops": 1.33, "speedup_vs_torch_ops_rounds": [1.3, 1.4],
                "torch_ops_bound": 1.6, "speedup_vs_torch_ops_beyond_gemm": 3.0},
            "router cpu N768_k12 T=128 residual": {  # fused within the GEMM's spread: no ratio beyond it
                "impls": {"fused": {"median_ms": 2.0}, "torch_ops": {"median_ms": 2.2},
                          "residual_gemm": {"median_ms": 2.05}},
                "speedup": 3.0, "speedup_vs_torch_ops": 1.1, "torch_ops_bound": 1.07},
            "ep gloo W=2 0.6b-layout D=768 T=2048/rank tau=0.50": {
                "impls": {"moepp_ep": {"median_ms": 10.0}, "vanilla_ep": {"median_ms": 16.0},
                          "remap_ep": {"median_ms": float("nan")}},
                "speedup_vs_vanilla_ep": 1.6, "ideal_speedup": 2.0, "fraction_of_ideal": 0.8,
                "bytes_vs_vanilla_ep": 0.5, "ffn_share": 0.5, "bytes_vs_remap_ep": 0.5},
        },
    }


def test_report_and_plot(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(summary()))
    report.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 0.6b | 0.50 | 0.490 (0.500) | 1.80x | 2.00x | 0.90 | 1.38x |" in text
    assert "10.00x the reference" in text and "bound any speedup at 12.50x" in text
    assert "Throttled" in text and "NVIDIA H200" in text
    assert ("swapped 819,200 tokens/s, 3.00x the model's own MoE modules (2.90-3.10 over 2 interleaved rounds) "
            "(273,067 tokens/s)") in text
    assert "fused 200.0 ms, 1.20x released_loop, 0.95 of the layer's GEMMs alone" in text
    assert ("wire bytes 0.500x vanilla EP's (FFN share 0.500), 0.500x remap-to-expert-0's; step 1.60x vanilla EP "
            "(ideal 2.00x, 0.80 of it)") in text
    assert ("1.33x the plain torch ops (1.30-1.40 over 2 interleaved rounds), (the fused router's residual GEMM "
            "alone bounds that at 1.60x; beyond each side's GEMM 3.00x)") in text
    assert "bounds that at 1.07x; the rest too small to time beside it)" in text
    assert (tmp_path / "speedup_vs_tau.png").stat().st_size > 1000


def test_readme_section_comes_from_the_newest_gpu_results(tmp_path):
    for name, date in (("old", "2026-01-01"), ("new", "2026-06-01")):
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "summary.json").write_text(json.dumps(summary(f"GPU-{name}", date)))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nstale\n{report.END}\nrest\n")
    report.update_readme(readme, tmp_path / "results")
    text = readme.read_text()
    assert "GPU-new" in text and "stale" not in text and text.endswith("rest\n")


def test_committed_readme_is_generated(tmp_path):
    """The README's performance section is what report.py makes of bench/results/ (not typed by hand)."""
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    report.update_readme(copy, ROOT / "bench" / "results")
    assert copy.read_text() == (ROOT / "README.md").read_text()
