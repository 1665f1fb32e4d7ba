{{/* Chart name, overridable; a label value, so at most 63 characters. */}}
{{- define "riffle-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of the release's object names: <release>-<chart>, or the release name alone when it
already contains the chart name. At most 63 characters (some names are DNS labels).
*/}}
{{- define "riffle-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of cluster-scoped objects: release names are only unique within a namespace, so the
namespace is part of it (ClusterRole names may be 253 characters long).
*/}}
{{- define "riffle-operator.clusterName" -}}
{{- printf "%s-%s" (include "riffle-operator.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "riffle-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object, without the component. */}}
{{- define "riffle-operator.commonLabels" -}}
helm.sh/chart: {{ include "riffle-operator.chart" . }}
app.kubernetes.io/name: {{ include "riffle-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "riffle-operator.tag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: riffle
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the operator's objects. */}}
{{- define "riffle-operator.labels" -}}
{{ include "riffle-operator.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Selector of the operator's pods. The component is part of it, so the `helm test` pod (same
name and instance, component "test") is never counted as an operator replica (PDB, Service,
`riffle-operator check`).
*/}}
{{- define "riffle-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "riffle-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The same selector as a `key=value,…` string (for `riffle-operator check --selector`). */}}
{{- define "riffle-operator.selector" -}}
{{- $pairs := list }}
{{- range $k, $v := (include "riffle-operator.selectorLabels" . | fromYaml) }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "riffle-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "riffle-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "riffle-operator.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "riffle-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "riffle-operator.tag" .) }}
{{- end }}
{{- end }}

{{- define "riffle-operator.leaseName" -}}
{{- default (include "riffle-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
What the operator does through the API server, verb by verb (controller.rs, kube's
finalizer helper and event recorder); nothing else, and never Secrets.
*/}}
{{- define "riffle-operator.rules" -}}
# Watch StreamJobs, re-read one before deciding, add/remove the cleanup finalizer (a patch).
- apiGroups: [riffle.dev]
  resources: [streamjobs]
  verbs: [get, list, watch, patch]
# The lifecycle record is written with replace_status (a PUT carrying the resourceVersion).
- apiGroups: [riffle.dev]
  resources: [streamjobs/status]
  verbs: [update]
# Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement
# admission is enabled.
- apiGroups: [riffle.dev]
  resources: [streamjobs/finalizers]
  verbs: [update]
# Worker pods: watched, server-side applied (apply creates, hence create), deleted.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, patch, delete]
# Per-generation job files: created once (get, then apply), deleted with their generation.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch, delete]
# The headless Service of a job's workers (server-side apply).
- apiGroups: [""]
  resources: [services]
  verbs: [create, patch]
# Events about StreamJobs (events.k8s.io/v1; a repeated event is patched).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
