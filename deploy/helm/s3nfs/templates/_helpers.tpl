{{/* The CSI driver's name: fixed, the binary registers under it. */}}
{{- define "s3nfs.driverName" -}}csi.s3nfs.io{{- end -}}

{{/* Prefix of every object's name. */}}
{{- define "s3nfs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains "s3nfs" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-s3nfs" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Labels of every object. Deliberately no helm.sh/chart and no app.kubernetes.io/managed-by: the
plain manifests in deploy/manifests/ are this chart rendered with its defaults, and must not claim
to be managed by Helm.
*/}}
{{- define "s3nfs.labels" -}}
app.kubernetes.io/name: s3nfs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of a component: include with (dict "root" $ "component" "node"). */}}
{{- define "s3nfs.selectorLabels" -}}
app.kubernetes.io/name: s3nfs
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The kubelet directory, without a trailing slash. */}}
{{- define "s3nfs.kubeletDir" -}}
{{- required "kubeletDir is required" .Values.kubeletDir | trimSuffix "/" -}}
{{- end -}}

{{/* The plugin's directory on the host: the node plugin's socket and state live there. */}}
{{- define "s3nfs.pluginDir" -}}
{{- include "s3nfs.kubeletDir" . }}/plugins/{{ include "s3nfs.driverName" . -}}
{{- end -}}

{{/* repository:tag of an image value. */}}
{{- define "s3nfs.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/* Environment shared by both s3nfs containers. */}}
{{- define "s3nfs.env" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: S3NFS_LOG_FORMAT
  value: {{ include "s3nfs.logFormat" . | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* securityContext of every unprivileged container. */}}
{{- define "s3nfs.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The Secret holding the node plugins' key pair for ReadWriteMany: the user's, or the chart's. */}}
{{- define "s3nfs.peerSecretName" -}}
{{- .Values.readWriteMany.peerSecretName | default (printf "%s-peer" (include "s3nfs.fullname" .)) -}}
{{- end -}}

{{/* Where the node plugin reads that key pair. */}}
{{- define "s3nfs.peerDir" -}}/etc/s3nfs/peer{{- end -}}


{{/* logFormat, checked. */}}
{{- define "s3nfs.logFormat" -}}
{{- if not (has .Values.logFormat (list "json" "text")) -}}
{{- fail (printf "logFormat must be json or text, not %q" (toString .Values.logFormat)) -}}
{{- end -}}
{{- .Values.logFormat -}}
{{- end -}}

{{/* metrics.prometheusRule.pendingFor in seconds (whole minutes only, e.g. 15m). */}}
{{- define "s3nfs.pendingForSeconds" -}}
{{- $p := toString .Values.metrics.prometheusRule.pendingFor -}}
{{- if not (regexMatch "^[1-9][0-9]*m$" $p) -}}
{{- fail (printf "metrics.prometheusRule.pendingFor must be whole minutes, e.g. 15m, not %q" $p) -}}
{{- end -}}
{{- mul (trimSuffix "m" $p | atoi) 60 -}}
{{- end -}}
