{{- define "lmforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lmforge.operatorName" -}}
{{- printf "%s-operator" (include "lmforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lmforge.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lmforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "lmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "lmforge.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Whether to render a Prometheus Operator object: "auto" asks the cluster. */}}
{{- define "lmforge.wanted" -}}
{{- $setting := index . 0 -}}
{{- $capabilities := index . 1 -}}
{{- $apiKind := index . 2 -}}
{{- if eq (toString $setting) "auto" -}}
{{- if $capabilities.APIVersions.Has $apiKind -}}true{{- end -}}
{{- else if eq (toString $setting) "true" -}}true
{{- end -}}
{{- end -}}

{{/*
The operator's rights in the namespaces it watches, enumerated from what it does
(operator/lmforge/operator/kube.py, training/reconcile.py, training/render.py;
tests/unit/test_chart.py and tests/integration/test_chart.py check them):
- its kinds: watched (get/list/watch; fromJob references read), never written but for
  their status, written with a merge patch (status: patch), and owner references with
  blockOwnerDeletion (finalizers: update, for OwnerReferencesPermissionEnforcement);
- children: server-side apply (create, patch) of ConfigMaps, PVCs, Services,
  ServiceAccounts, Roles, RoleBindings and batch Jobs; Jobs of older attempts deleted;
  Jobs, Pods and the trainers' report ConfigMaps watched; report ConfigMaps and
  input PVCs read (get), which is also what lets it grant a trainer get/patch on its
  own report ConfigMap (RBAC forbids granting rights one does not hold);
- Events created on the jobs;
- serving: server-side apply of Deployments and HorizontalPodAutoscalers (an HPA no longer
  wanted is listed and deleted), Deployments watched; the replicas' report ConfigMap read
  and cleaned with a merge patch (granted to replicas the same way as to trainers).
No Secrets, no pods/exec, no writes to Pods, nothing cluster-scoped.
*/}}
{{- define "lmforge.rules" -}}
- apiGroups: [lmforge.io]
  resources: [finetunejobs, alignmentjobs, inferenceservices]
  verbs: [get, list, watch]
- apiGroups: [lmforge.io]
  resources: [finetunejobs/status, alignmentjobs/status, inferenceservices/status]
  verbs: [patch]
- apiGroups: [lmforge.io]
  resources: [finetunejobs/finalizers, alignmentjobs/finalizers, inferenceservices/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, create, patch, delete]
{{- end -}}
