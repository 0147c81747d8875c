"""What a bench records about the machine instance (moka_jax.support.machine)."""

from moka_jax.support import machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0x1000065
cpu MHz\t\t: 2596.150
siblings\t: 2
cpu cores\t: 2
bogomips\t: 5192.30
flags\t\t: fpu avx2 avx512f hypervisor
processor\t: 1
cpu MHz\t\t: 2600.000
"""


def test_instance_info_reads_family_clock_smt_and_flag_digest():
    flags = ["fpu", "avx2", "avx512f", "hypervisor"]
    info = machine.instance_info(CPUINFO, flags)
    assert (info["cpu_family"], info["cpu_model_id"], info["stepping"]) == ("25", "17", "1")
    assert info["microcode"] == "0x1000065" and info["bogomips"] == "5192.30"
    assert info["cpu_mhz"] == round((2596.150 + 2600.0) / 2, 1)
    assert info["smt"] is False and info["hypervisor"] is True
    # the digest tells flag sets apart and is stable for one set
    assert info["flags_sha1"] == machine.instance_info(CPUINFO, flags)["flags_sha1"]
    assert info["flags_sha1"] != machine.instance_info(CPUINFO, flags[:-1])["flags_sha1"]


def test_instance_info_without_cpuinfo_gives_nones_not_errors():
    info = machine.instance_info("", [])
    assert info["cpu_family"] is None and info["cpu_mhz"] is None and info["smt"] is None
    assert info["flags_sha1"] is None


def test_describe_carries_the_instance_fields():
    d = machine.describe()
    for key in ("cpu_model", "cpu_family", "cpu_mhz", "caches", "flags_sha1",
                "load_average_1m_at_start"):
        assert key in d


def test_one_line_names_the_instance_kind_where_linux_shows_it(monkeypatch):
    kernels = {"jax": "0.0", "backend": "cpu", "device_kind": "cpu"}
    monkeypatch.setattr(machine, "jax_kernels", lambda: kernels)
    info = {"cpu_model": "AMD EPYC", "cpu_count": 2, "cpu_family": "25", "cpu_model_id": "17"}
    monkeypatch.setattr(machine, "cpu_info", lambda: info)
    assert machine.one_line().startswith("AMD EPYC (family 25 model 17), 2 cores; jax 0.0")
    # without the ids (no /proc/cpuinfo) the line stays whole, not "family None"
    monkeypatch.setattr(machine, "cpu_info", lambda: {**info, "cpu_family": None})
    assert machine.one_line().startswith("AMD EPYC, 2 cores; jax 0.0")
