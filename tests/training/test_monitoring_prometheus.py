"""The shipped dashboard and alert rules against a real Prometheus scraping a live 2-rank run.

A Prometheus server (Debian's ``prometheus`` package, installed here with apt when missing, as the
Slurm tests install Slurm; skipped with the reason when that is impossible) runs on 127.0.0.1 with
a temporary TSDB, scraping every second the ``/metrics`` endpoint rank 0 of ``megatron-sl train``
serves. While the run trains:

* every target of every panel of ``dashboards/grafana-megatron-sl.json`` (Grafana variables
  replaced by match-all values) is valid PromQL and returns data;
* every alert expression of ``dashboards/alerts.yml`` is valid PromQL, its signal (the expression
  without the trailing threshold comparison) returns data, and the NaN / checkpoint-failure alerts
  do not fire on a healthy run;

then the whole run is SIGSTOPped and the stall alert (a test copy of the rules with a 3 s threshold
and ``for: 1s``) must fire; after SIGCONT the run finishes with exit code 0, its last scrape shows
``msl_run_finished 1`` and the stall signal no longer returns data. ``promtool check rules`` /
``check config`` pass on the shipped files (the run has TensorBoard and JSONL switched off, which
is checked too), and ``promtool test rules dashboards/alerts_test.yml``
checks the shipped thresholds on synthetic series. The textfile-collector file is parsed back too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from _dist import free_port
from training_helpers import REPO, megatron_sl_cmd, rank_env, tiny_overrides

DASH = REPO / "dashboards"
THRESHOLD = re.compile(r"^(?P<signal>.*\S)\s*(?P<op>>=|<=|>|<|==|!=)\s*(?P<value>[-+0-9.e]+)\s*$", re.S)
GRAFANA_VARS = {"$run": ".*", "$job_id": ".*", "${run}": ".*", "${job_id}": ".*", "$__rate_interval": "5s"}


def _install_prometheus():
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return ("Debian's prometheus package is not installed and cannot be installed here (needs root and "
                "apt-get; CI runs as root)")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return None


@pytest.fixture(scope="module")
def promtool():
    why = _install_prometheus()
    if why:
        pytest.skip(why)
    return shutil.which("promtool")


OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with OPENER.open(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 400 for bad PromQL, with the error in the body
        return json.loads(e.read())
    except urllib.error.URLError:  # the server is not listening yet
        return {}


def _result(base: str, expr: str) -> list:
    res = _query(base, expr)
    assert res["status"] == "success", f"{expr!r}: {res}"
    return res["data"]["result"]


def _alerts(base: str) -> list:
    with OPENER.open(f"{base}/api/v1/alerts", timeout=10) as r:
        return json.loads(r.read())["data"]["alerts"]


def _wait(what, fn, timeout, proc=None, interval=0.5):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        value = fn()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the training run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _panel_targets():
    dash = json.loads((DASH / "grafana-megatron-sl.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"]
            for k, v in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(k, v)
            assert "$" not in expr, f"panel {panel['title']!r}: unreplaced variable in {expr!r}"
            out.append((panel["title"], expr))
    return out


def _alert_rules(path: Path) -> list:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "alert" in r]


def _split(expr: str):
    m = THRESHOLD.match(expr.strip())
    assert m, f"alert expression {expr!r} does not end in '<comparison> <threshold>'"
    return m["signal"], m["op"], float(m["value"])


def test_promtool_checks_the_shipped_rules_and_config(promtool):
    # test rules: the shipped thresholds on synthetic series (stall after 15 min unless finished, NaN,
    # checkpoint failure, throughput under half of the hour's mean for 10 min)
    for args in (["check", "rules", str(DASH / "alerts.yml")], ["check", "config", str(DASH / "prometheus.yml")],
                 ["test", "rules", str(DASH / "alerts_test.yml")]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for r in _alert_rules(DASH / "alerts.yml")}
    assert names == {"MegatronSLRunStalled", "MegatronSLNonFiniteLoss", "MegatronSLThroughputDrop",
                     "MegatronSLCheckpointFailures"}


def _tree(pid: int) -> list:
    """``pid`` and all its descendants (torchrun starts each rank in a session of its own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _signal_tree(proc, sig):
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_dashboard_and_alerts_against_a_live_run(promtool, tiny_data, tmp_path):
    exporter, server = free_port(), free_port()
    base = f"http://127.0.0.1:{server}"
    # A test copy of the rules: same expressions, stall threshold 3 s and for: 1s.
    rules = yaml.safe_load((DASH / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "MegatronSLRunStalled":
            sig, op, _ = _split(rule["expr"])
            rule["expr"], rule["for"] = f"{sig} {op} 3", "1s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "prom.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "megatron-sl", "static_configs": [{"targets": [f"127.0.0.1:{exporter}"]}]}],
    }))
    check = subprocess.run([promtool, "check", "config", str(tmp_path / "prom.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    out, textfile = tmp_path / "run", tmp_path / "textfile" / "{run}_{job_id}.prom"
    cmd = megatron_sl_cmd("train", "--config", str(REPO / "configs" / "tiny_sl.yaml"),
                          *tiny_overrides(tiny_data, out, "launch.nproc_per_node=2", "train.train_iters=150",
                                          "eval.interval=100", "eval.iters=1", "run.save_interval=10",
                                          f"metrics.prometheus_port={exporter}", "metrics.prometheus_addr=127.0.0.1",
                                          "metrics.prometheus_linger_s=3", f"metrics.prometheus_textfile={textfile}",
                                          "metrics.job_id='4242'", "metrics.tensorboard=false", "metrics.jsonl=false"))
    prom = train = None
    log = open(tmp_path / "train.log", "w")
    try:
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prom.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{server}"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
        train = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        # enough scrapes of a training run: a checkpoint and several steps inside the rate windows
        _wait("30 scraped steps and a checkpoint", lambda: _query(base, "msl_train_step > 30 and on() "
                                                                 "(msl_checkpoints_total > 0)").get("data", {})
              .get("result"), timeout=180, proc=train)

        for title, expr in _panel_targets():
            assert _result(base, expr), f"panel {title!r}: {expr!r} returned no data"
        labels = _result(base, "msl_train_loss")[0]["metric"]
        assert (labels["run"], labels["job_id"], labels["tp"], labels["dp"]) == ("run", "4242", "1", "2")
        ranks = {r["metric"]["rank"] for r in _result(base, "msl_rank_tokens_per_second")}
        assert ranks == {"0", "1"}
        for rule in _alert_rules(tmp_path / "alerts.yml"):
            _result(base, rule["expr"])  # valid PromQL
            signal_expr, _, _ = _split(rule["expr"])
            assert _result(base, signal_expr), f"alert {rule['alert']}: signal {signal_expr!r} returned no data"
            if rule["alert"] in ("MegatronSLNonFiniteLoss", "MegatronSLCheckpointFailures"):
                assert not _result(base, rule["expr"]), f"{rule['alert']} fires on a healthy run"
        mfu = {r["metric"]["basis"]: float(r["value"][1]) for r in _result(base, "msl_mfu_ratio")}
        assert 0 < mfu["sl"] < mfu["dense_equivalent"] < 1, mfu

        stopped = _tree(train.pid)
        assert len(stopped) >= 4, stopped  # the CLI, the torchrun agent and two ranks
        _signal_tree(train, signal.SIGSTOP)
        try:
            firing = _wait("MegatronSLRunStalled firing", lambda: [
                a for a in _alerts(base) if a["labels"]["alertname"] == "MegatronSLRunStalled"
                and a["state"] == "firing"], timeout=60)
            assert firing[0]["labels"]["run"] == "run" and firing[0]["labels"]["job_id"] == "4242"
            assert float(firing[0]["value"]) > 3
        finally:
            _signal_tree(train, signal.SIGCONT)
        assert train.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-4000:]
        # the lingering endpoint's last scrape says the run finished: no stall any more
        assert _result(base, "last_over_time(msl_run_finished[1m]) == 1")
        stall = next(r for r in _alert_rules(tmp_path / "alerts.yml") if r["alert"] == "MegatronSLRunStalled")
        assert not _result(base, _split(stall["expr"])[0])
        assert float(_result(base, "max_over_time(msl_train_step[5m])")[0]["value"][1]) == 150
    finally:
        for p in (train, prom):
            if p is not None and p.poll() is None:
                if p is train:
                    for pid in _tree(p.pid):
                        for sig in (signal.SIGCONT, signal.SIGKILL):
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, sig)
                else:
                    p.terminate()
                p.wait(timeout=30)
        log.close()

    # the other sinks were switched off: no event files, no metrics.jsonl (summary.json is not a sink)
    assert not (out / "tensorboard").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "summary.json").is_file()
    # the textfile-collector file: the same metrics in the exposition format, finished
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "textfile" / "run_4242.prom").read_text())}
    assert families["msl_run_finished"].samples[0].value == 1
    assert families["msl_train_step"].samples[0].value == 150
    assert families["msl_train_steps"].samples[0].name == "msl_train_steps_total"
