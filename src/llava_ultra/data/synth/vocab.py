"""SynthUS vocabulary: scan geometry per site, finding mix, locations and report phrases.

Everything here is data (no code paths draw from an RNG): the probe of each site and its field of
view, which findings a site may show and where, and the Chinese/English sentences reports are built
from. Geometry constants (`TOP`, `DEPTH`) are in units of the image height and shared by the
canvas, the planner and the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNTH_VERSION = "1"
SPLITS = ("train", "val", "test")
TOP = 0.06  # scan region starts here (normalised depth); above it is the banner area
DEPTH = 0.9  # scan depth as a fraction of the image height
MIN_FINDING_PX = 2.5


# site -> probe geometry, field of view (cm), finding mix. Stones only where stones form (the
# gallbladder, drawn in the liver view, and the kidney); cardiac findings are annular calcification.
@dataclass(frozen=True)
class Probe:
    """Scan geometry: 'linear' (rectangle) or 'sector' (fan from a virtual apex at `apex_y`,
    above the image top for a curved abdominal probe, just under it for a phased cardiac one)."""

    kind: str
    fov_cm: float
    apex_y: float = 0.0
    half_angle: float = 0.0


_CURVED = {"kind": "sector", "apex_y": -0.1, "half_angle": 34.0}
PROBES = {
    "thyroid": Probe("linear", 4.0),
    "breast": Probe("linear", 4.0),
    "liver": Probe(fov_cm=16.0, **_CURVED),
    "kidney": Probe(fov_cm=12.0, **_CURVED),
    "uterus": Probe(fov_cm=10.0, **_CURVED),
    "cardiac": Probe("sector", 16.0, apex_y=0.03, half_angle=40.0),
}
FINDING_MIX: dict[str, dict[str, float]] = {
    "thyroid": {"cyst": 0.2, "nodule": 0.35, "calcification": 0.2, "none": 0.25},
    "breast": {"cyst": 0.3, "nodule": 0.35, "calcification": 0.15, "none": 0.2},
    "liver": {"cyst": 0.25, "nodule": 0.15, "calcification": 0.1, "stone": 0.25, "none": 0.25},
    "kidney": {"cyst": 0.3, "nodule": 0.1, "calcification": 0.05, "stone": 0.3, "none": 0.25},
    "uterus": {"cyst": 0.15, "nodule": 0.4, "calcification": 0.1, "none": 0.35},
    "cardiac": {"calcification": 0.35, "none": 0.65},
}


def _thyroid_locs() -> dict[str, tuple[str, str]]:
    sides = {"right": ("右", "right"), "left": ("左", "left")}
    parts = {
        "upper": ("上极", "upper pole of the {} thyroid lobe"),
        "middle": ("中部", "middle portion of the {} thyroid lobe"),
        "lower": ("下极", "lower pole of the {} thyroid lobe"),
    }
    return {
        f"{s}_lobe_{p}": (f"甲状腺{sz}叶{pz}", pe.format(se))
        for s, (sz, se) in sides.items()
        for p, (pz, pe) in parts.items()
    }


def _breast_locs() -> dict[str, tuple[str, str]]:
    quads = {
        "upper_outer": ("外上象限", "upper outer quadrant"),
        "lower_outer": ("外下象限", "lower outer quadrant"),
        "upper_inner": ("内上象限", "upper inner quadrant"),
        "lower_inner": ("内下象限", "lower inner quadrant"),
    }
    return {
        f"{s}_{q}": (f"{sz}乳{qz}", f"{qe} of the {s} breast")
        for s, sz in (("right", "右"), ("left", "左"))
        for q, (qz, qe) in quads.items()
    }


def _kidney_locs() -> dict[str, tuple[str, str]]:
    parts = {
        "upper": ("上极", "upper pole"),
        "middle": ("中部", "middle portion"),
        "lower": ("下极", "lower pole"),
    }
    return {
        f"{s}_{p}": (f"{sz}肾{pz}", f"{pe} of the {s} kidney")
        for s, sz in (("right", "右"), ("left", "左"))
        for p, (pz, pe) in parts.items()
    }


# site -> location key -> (Chinese, English). The key is what `meta["location"]` holds.
LOCATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "thyroid": _thyroid_locs(),
    "breast": _breast_locs(),
    "liver": {
        "right_lobe": ("肝右叶", "right lobe of the liver"),
        "left_lobe": ("肝左叶", "left lobe of the liver"),
        "gallbladder": ("胆囊", "gallbladder"),
    },
    "kidney": _kidney_locs(),
    "uterus": {
        "anterior_wall": ("子宫前壁", "anterior wall of the uterus"),
        "posterior_wall": ("子宫后壁", "posterior wall of the uterus"),
        "fundus": ("宫底", "uterine fundus"),
        "cervix": ("宫颈", "cervix"),
    },
    "cardiac": {
        "mitral_annulus": ("二尖瓣环", "mitral annulus"),
        "tricuspid_annulus": ("三尖瓣环", "tricuspid annulus"),
    },
}

# site -> finding type -> allowed location keys
ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    "thyroid": dict.fromkeys(("cyst", "nodule", "calcification"), tuple(LOCATIONS["thyroid"])),
    "breast": dict.fromkeys(("cyst", "nodule", "calcification"), tuple(LOCATIONS["breast"])),
    "liver": {
        **dict.fromkeys(("cyst", "nodule", "calcification"), ("right_lobe", "left_lobe")),
        "stone": ("gallbladder",),
    },
    "kidney": dict.fromkeys(("cyst", "nodule", "calcification", "stone"), tuple(LOCATIONS["kidney"])),
    "uterus": {
        "cyst": ("cervix",),
        "nodule": ("anterior_wall", "posterior_wall", "fundus"),
        "calcification": ("anterior_wall", "posterior_wall"),
    },
    "cardiac": {"calcification": ("mitral_annulus", "tricuspid_annulus")},
}

# site -> [(zh, en)] reasons for the examination
HISTORY: dict[str, list[tuple[str, str]]] = {
    "thyroid": [("颈部不适", "Neck discomfort"), ("发现颈部肿物1周", "Neck lump noticed one week ago")],
    "breast": [("乳房胀痛", "Breast tenderness"), ("自查发现乳房肿块", "Self-detected breast lump")],
    "liver": [("右上腹痛", "Right upper abdominal pain"), ("肝功能异常", "Abnormal liver function tests")],
    "kidney": [("腰痛", "Flank pain"), ("镜下血尿", "Microscopic hematuria")],
    "uterus": [("月经量增多", "Heavy menstrual bleeding"), ("下腹痛", "Lower abdominal pain")],
    "cardiac": [("胸闷", "Chest tightness"), ("心悸", "Palpitations")],
}
HISTORY_COMMON = [("体检", "Routine health check-up"), ("复查", "Follow-up examination")]

# site -> [(zh, en)] description of the organ as a whole
NORMAL: dict[str, list[tuple[str, str]]] = {
    "thyroid": [
        (
            "甲状腺形态大小正常，包膜光整，实质回声均匀。",
            "The thyroid is normal in shape and size, with a smooth capsule and homogeneous parenchymal echotexture.",
        ),
        (
            "甲状腺左右叶及峡部大小正常，被膜完整，腺体回声分布均匀。",
            "Both thyroid lobes and the isthmus are normal in size, with an intact capsule and evenly distributed glandular echoes.",
        ),
    ],
    "breast": [
        (
            "双侧乳腺腺体层结构清晰，回声分布均匀，导管未见扩张。",
            "Both breasts show a clearly layered glandular structure with evenly distributed echoes and no ductal dilatation.",
        ),
        (
            "双乳皮肤及皮下脂肪层未见异常，腺体层回声均匀。",
            "The skin and subcutaneous fat of both breasts are unremarkable and the glandular layer is homogeneous.",
        ),
    ],
    "liver": [
        (
            "肝脏形态大小正常，包膜光整，实质回声均匀，肝内管道结构清晰。胆囊大小正常，壁光滑。",
            "The liver is normal in shape and size with a smooth capsule, homogeneous parenchyma and clearly "
            "displayed intrahepatic vessels. The gallbladder is normal in size with a smooth wall.",
        ),
        (
            "肝脏大小形态正常，肝实质回声细密均匀。胆囊形态正常，囊壁不厚。",
            "The liver is normal in size and shape with fine, homogeneous parenchymal echoes. The gallbladder "
            "is normal in shape without wall thickening.",
        ),
    ],
    "kidney": [
        (
            "双肾形态大小正常，包膜光整，皮髓质分界清晰，集合系统未见分离。",
            "Both kidneys are normal in shape and size with smooth capsules, clear corticomedullary "
            "differentiation and no separation of the collecting system.",
        ),
        (
            "双肾大小正常，实质回声均匀，肾盂未见扩张。",
            "Both kidneys are normal in size with homogeneous parenchyma and no pelvic dilatation.",
        ),
    ],
    "uterus": [
        (
            "子宫前位，形态大小正常，肌层回声均匀，内膜居中，厚度正常。",
            "The uterus is anteverted and normal in shape and size, with homogeneous myometrium and a "
            "central endometrium of normal thickness.",
        ),
        (
            "子宫大小正常，轮廓清晰，宫腔线居中。",
            "The uterus is normal in size with a clear outline and a central cavity line.",
        ),
    ],
    "cardiac": [
        (
            "各房室大小正常，室间隔及左室壁厚度正常，运动协调。",
            "All cardiac chambers are normal in size; the interventricular septum and left ventricular wall "
            "are of normal thickness with coordinated motion.",
        ),
        (
            "心脏各腔室内径正常，室壁运动未见异常。",
            "Chamber dimensions are normal and wall motion is unremarkable.",
        ),
    ],
}
NO_LESION = {
    "cardiac": ("各瓣膜形态及活动未见明显异常。", "The valves appear normal in morphology and motion."),
}
NO_LESION_DEFAULT = ("未见明显占位性病变。", "No obvious space-occupying lesion is seen.")

# finding type -> [(zh, en)] sentence templates; {loc}/{loc_en} location, {w}/{h} size in cm
FINDING_TEXT: dict[str, list[tuple[str, str]]] = {
    "cyst": [
        (
            "{loc}见一大小约{w}cm×{h}cm的无回声区，边界清，壁光滑，后方回声增强。",
            "An anechoic area measuring approximately {w} cm × {h} cm is seen in the {loc_en}, "
            "well-defined with a smooth wall and posterior acoustic enhancement.",
        ),
        (
            "{loc}可见一无回声区，大小约{w}cm×{h}cm，形态规则，内透声好，后方回声增强。",
            "In the {loc_en} there is an anechoic area of about {w} cm × {h} cm, regular in shape with "
            "good internal sound transmission and posterior acoustic enhancement.",
        ),
    ],
    "nodule": [
        (
            "{loc}见一大小约{w}cm×{h}cm的低回声结节，边界清，形态欠规则，CDFI：未见明显血流信号。",
            "A hypoechoic nodule measuring approximately {w} cm × {h} cm is seen in the {loc_en}, "
            "well-defined and slightly irregular in shape; CDFI: no obvious blood flow signal.",
        ),
        (
            "{loc}探及一实性低回声结节，大小约{w}cm×{h}cm，边界尚清，内部回声欠均匀。",
            "A solid hypoechoic nodule of about {w} cm × {h} cm is detected in the {loc_en}, with fairly "
            "clear margins and slightly heterogeneous internal echoes.",
        ),
    ],
    "calcification": [
        (
            "{loc}见一强回声光点，大小约{w}cm×{h}cm，后方伴声影。",
            "A hyperechoic focus measuring approximately {w} cm × {h} cm is seen in the {loc_en}, with "
            "posterior acoustic shadowing.",
        ),
        (
            "{loc}可见点状强回声，大小约{w}cm×{h}cm，后伴声影。",
            "A punctate echogenic focus of about {w} cm × {h} cm is visible in the {loc_en}, with a "
            "posterior acoustic shadow.",
        ),
    ],
    "stone": [
        (
            "{loc}内见一弧形强回声团，大小约{w}cm×{h}cm，后方伴明显声影。",
            "An arc-shaped hyperechoic mass measuring approximately {w} cm × {h} cm is seen within the "
            "{loc_en}, with marked posterior acoustic shadowing.",
        ),
        (
            "{loc}内可见一强回声团，大小约{w}cm×{h}cm，表面呈弧形，后伴声影。",
            "Within the {loc_en} there is a hyperechoic mass of about {w} cm × {h} cm with an "
            "arc-shaped surface and a posterior acoustic shadow.",
        ),
    ],
}

# (site, finding type) -> (zh, en) diagnosis; "none" uses the site name
DIAGNOSIS: dict[tuple[str, str], tuple[str, str]] = {
    ("thyroid", "cyst"): ("{loc}囊性结节 TI-RADS 2类", "Cystic nodule in the {loc_en}, TI-RADS 2"),
    ("thyroid", "nodule"): ("{loc}实性结节 TI-RADS 3类", "Solid nodule in the {loc_en}, TI-RADS 3"),
    ("thyroid", "calcification"): ("{loc}钙化灶 TI-RADS 4a类", "Calcification in the {loc_en}, TI-RADS 4a"),
    ("breast", "cyst"): ("{loc}囊肿 BI-RADS 2类", "Cyst in the {loc_en}, BI-RADS 2"),
    ("breast", "nodule"): ("{loc}实性结节 BI-RADS 3类", "Solid nodule in the {loc_en}, BI-RADS 3"),
    ("breast", "calcification"): ("{loc}钙化灶 BI-RADS 4a类", "Calcification in the {loc_en}, BI-RADS 4a"),
    ("liver", "cyst"): ("{loc}囊肿", "Cyst in the {loc_en}"),
    ("liver", "nodule"): (
        "{loc}实性结节，建议进一步检查",
        "Solid nodule in the {loc_en}; further evaluation recommended",
    ),
    ("liver", "calcification"): ("{loc}钙化灶", "Calcification in the {loc_en}"),
    ("liver", "stone"): ("胆囊结石", "Gallbladder stone"),
    ("kidney", "cyst"): ("{loc}囊肿", "Cyst in the {loc_en}"),
    ("kidney", "nodule"): (
        "{loc}实性结节，建议进一步检查",
        "Solid nodule in the {loc_en}; further evaluation recommended",
    ),
    ("kidney", "calcification"): ("{loc}钙化灶", "Calcification in the {loc_en}"),
    ("kidney", "stone"): ("{loc}结石", "Stone in the {loc_en}"),
    ("uterus", "cyst"): ("宫颈纳氏囊肿", "Nabothian cyst of the cervix"),
    ("uterus", "nodule"): ("{loc}实性结节，考虑子宫肌瘤", "Solid nodule in the {loc_en}, likely leiomyoma"),
    ("uterus", "calcification"): ("{loc}钙化灶", "Calcification in the {loc_en}"),
    ("cardiac", "calcification"): ("{loc}钙化", "Calcification of the {loc_en}"),
}
