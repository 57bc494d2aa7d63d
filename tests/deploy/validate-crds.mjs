// Validates Prometheus Operator objects (ServiceMonitor, PrometheusRule) against
// prometheus-operator's own schemas, which kubernetes-validate does not carry: the schemas come
// with @kubernetes-models/prometheus-operator (generated from prometheus-operator's API types).
// Reads a JSON array of objects on stdin; prints one line per invalid object and exits 1 if any.
// These schemas check types, required fields and patterns (durations, enums), but accept
// unknown fields: tests/deploy/check.py reads every field it sets back by its exact key.
import { PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = { PrometheusRule, ServiceMonitor };
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const obj of JSON.parse(input)) {
  const name = `${obj.kind} ${obj.metadata?.name}`;
  const Model = models[obj.kind];
  if (!Model) {
    console.log(`${name}: no schema for kind ${obj.kind}`);
    failed++;
    continue;
  }
  if (obj.apiVersion !== Model.apiVersion) {
    console.log(`${name}: apiVersion ${obj.apiVersion}, the schema is for ${Model.apiVersion}`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    console.log(`${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
