mod json;
mod sdk_compat;
