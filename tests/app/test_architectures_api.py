"""The architecture catalogue over HTTP: listed with what each supports, checked on submit."""


def test_architectures_lists_builtins_and_torchvision_with_what_they_support(client):
    r = client.get("/api/v1/architectures")
    assert r.status_code == 200
    by_name = {a["name"]: a for a in r.json()}
    assert by_name["simcnn"]["source"] == "built-in" and by_name["simcnn"]["width_multiplier"]
    mobilenet = by_name["tv_mobilenet_v2"]
    assert mobilenet["source"] == "torchvision" and not mobilenet["width_multiplier"]
    assert "depthwise" in mobilenet["features"] and mobilenet["unsupported"] is None
    assert "LayerNorm" in by_name["tv_convnext_tiny"]["unsupported"]


def test_submit_refuses_a_width_the_architecture_does_not_have(client):
    r = client.post("/api/v1/jobs", json={"arch": "tv_resnet18", "width": 0.5})
    assert r.status_code == 422
    assert "set width to 1" in r.json()["detail"]
    r = client.post("/api/v1/jobs", json={"arch": "tv_convnext_tiny", "width": 1})
    assert r.status_code == 422 and "LayerNorm" in r.json()["detail"]


def test_a_job_without_a_width_takes_its_architectures_default(client):
    """Every trainable architecture can be submitted with no width: the job trains at the
    default its registry entry declares (1 for torchvision's fixed layouts). Before, the
    schema's single default (x0.25) was refused for them with 422."""
    from mwt_core.models import architecture_info

    listed = client.get("/api/v1/architectures").json()
    trainable = [a for a in listed if a["unsupported"] is None]
    assert any(not a["width_multiplier"] for a in trainable)
    answers = {a["name"]: client.post("/api/v1/jobs", json={"arch": a["name"], "epochs": 1})
               for a in trainable}
    refused = {name: r.json()["detail"] for name, r in answers.items() if r.status_code != 202}
    assert not refused, refused
    for a in trainable:
        width = answers[a["name"]].json()["params"]["width"]
        assert width == architecture_info(a["name"]).default_width == a["default_width"], a["name"]
    r = client.post("/api/v1/jobs", json={"arch": "tv_mobilenet_v2", "width": None, "epochs": 1})
    assert r.status_code == 202 and r.json()["params"]["width"] == 1
