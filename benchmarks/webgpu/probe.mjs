// What the adapter offers under a set of Dawn toggles: features, subgroup sizes and, where the
// experimental subgroup-matrix feature shows, its configurations (cooperative matrix shapes).
//   node probe.mjs --dawn DIR [--toggle enable-dawn-features=allow_unsafe_apis ...]
import path from "node:path";
import { mergeToggles } from "./common.mjs";

const args = { toggle: [] };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, "");
  if (key === "toggle") args.toggle.push(process.argv[i + 1]);
  else args[key] = process.argv[i + 1];
}
const { create, globals } = await import(path.resolve(args.dawn, "index.js"));
Object.assign(globalThis, globals);
const gpu = create(mergeToggles(args.toggle));
const adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
const info = adapter.info || {};
const out = {
  toggles: mergeToggles(args.toggle),
  description: info.description,
  subgroupMinSize: info.subgroupMinSize,
  subgroupMaxSize: info.subgroupMaxSize,
  features: [...adapter.features].sort(),
  subgroupMatrixConfigs: [...(info.subgroupMatrixConfigs ?? [])].map((c) => ({
    component: c.componentType, result: c.resultComponentType, M: c.M, N: c.N, K: c.K,
  })),
};
const matrix = "chromium-experimental-subgroup-matrix";
if (adapter.features.has(matrix)) {
  const device = await adapter.requestDevice({ requiredFeatures: [matrix, "shader-f16"].filter((f) => adapter.features.has(f)) });
  out.deviceFeatures = [...device.features].sort();
  device.destroy();
}
console.log(JSON.stringify(out));
process.exit(0);
