"""sd-scripts' model-version strings (the one function the DVAR plugin's loader calls)."""


def get_model_version_str_for_sd1_sd2(v2: bool, v_parameterization: bool) -> str:
    if not v2:
        return "sd_v1"
    return "sd_v2_768_v" if v_parameterization else "sd_v2_512"
